// Process-wide mode of index validation on devices where it costs a host synchronisation
// (CUDA):
//   sync  (the default) an out-of-range index raises a clear error at the call, which
//         waits for the device once to learn it;
//   async the call does not wait: the device records the first bad index of every checked
//         call, and memory_ext.ops.check_errors() (check_async_index_errors) raises it
//         later with the same message;
//   off   no report at all.
// Whatever the mode, kernels never read out of bounds: an out-of-range lookup is treated
// as absent (it adds nothing to a bag and gets a zero weight gradient), and rows_to_dense
// skips rows outside [0, n_rows) (rows that are not strictly ascending give an unspecified
// but in-bounds and deterministic result). The backward of embedding_bag waits for the
// device anyway to size its outputs, so it raises at the call in sync and async modes.
// The CPU kernels always check at the call: it costs them nothing.
#pragma once

namespace memory_ext {

enum class IndexCheckMode { kSync, kAsync, kOff };

IndexCheckMode index_check_mode();
void set_index_check_mode(IndexCheckMode mode);

// Whether bad indices are reported at all (sync or async).
inline bool index_checks_enabled() { return index_check_mode() != IndexCheckMode::kOff; }

// Raises the first index error recorded in async mode since the last call, and clears it;
// nothing without a reader (a build without CUDA records nothing).
void check_async_index_errors();

// The CUDA library registers the function that reads (and clears) its devices' records.
using AsyncIndexErrorReader = void (*)();
void set_async_index_error_reader(AsyncIndexErrorReader reader);

}  // namespace memory_ext

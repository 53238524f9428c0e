// Process-wide switch for index validation on devices where it costs a host
// synchronisation (CUDA). On by default: an out-of-range index raises a clear error. Off,
// kernels never read out of bounds but treat an out-of-range lookup as absent (it adds
// nothing to a bag and gets a zero weight gradient), so callers who validated their
// indices elsewhere skip the per-call synchronisation. rows_to_dense likewise skips rows
// outside [0, n_rows); rows that are not strictly ascending give an unspecified (but
// in-bounds and deterministic) result. The CPU kernels always check: it costs them
// nothing.
#pragma once

namespace memory_ext {

bool index_checks_enabled();
void set_index_checks(bool enabled);

}  // namespace memory_ext

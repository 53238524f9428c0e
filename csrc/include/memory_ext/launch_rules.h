// Host-side launch decisions of the CUDA ops that depend only on sizes, addresses and
// flags, kept as pure functions (torch- and CUDA-free) so the CPU tests check them
// (tests/launch_rules_test.cpp) and the emulations launch what the launchers would.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "memory_ext/host_device.h"

namespace memory_ext::cuda {

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Vector accesses of vec elements (16 bytes) need rows of a whole number of vectors and
// 16-byte aligned bases; a null base (a buffer the launch does not use) does not count.
inline bool use_vector_path(int64_t dim, int vec, std::initializer_list<const void*> bases) {
  if (dim % vec != 0) return false;
  for (const void* p : bases)
    if (!is_aligned(p, 16)) return false;
  return true;
}

// One buffer a kernel moves in vectors: its base address and the bytes of its element
// (a buffer of float32 partial sums next to bf16 rows moves twice the bytes per vector).
struct VectorBase {
  const void* base;
  int elem_bytes;
};

// Elements per access of a kernel that moves rows of `dim` elements as vectors of up to
// `max_vec` elements (a power of two): the widest of max_vec, max_vec / 2, ..., 1 such that
// a row is a whole number of vectors and every base is aligned to its vector's bytes (at
// most 16: wider vectors are moved as 16-byte pieces). Stepping down keeps a row that is
// only 8- or 4-byte aligned (an odd dim of 16-bit values, a view with a storage offset) on
// 8- or 4-byte accesses instead of one element at a time. A null base (a buffer the launch
// does not use) does not count. (Peeling a misaligned head instead would keep 16 bytes, but
// when a row is not a whole number of 16-byte vectors each row starts at another offset,
// and the buffers of one kernel may be misaligned by different amounts, so every row and
// buffer would need its own split; one width per launch keeps one code path.)
inline int widest_vector(int64_t dim, int max_vec, std::initializer_list<VectorBase> bases) {
  int vec = max_vec;
  for (; vec > 1; vec /= 2) {
    bool fits = dim % vec == 0;
    for (const VectorBase& b : bases) {
      const int bytes = vec * b.elem_bytes;
      fits = fits && (b.base == nullptr || is_aligned(b.base, bytes < 16 ? bytes : 16));
    }
    if (fits) break;
  }
  return vec;
}

// Calls f.template operator()<VEC>() for a vec of widest_vector(..., MaxVec, ...), so a
// kernel is instantiated only for MaxVec, MaxVec / 2, ..., 1.
template <int MaxVec, typename F>
void with_vector(int vec, F&& f) {
  if constexpr (MaxVec > 1) {
    if (vec >= MaxVec) return f.template operator()<MaxVec>();
    return with_vector<MaxVec / 2>(vec, f);
  } else {
    return f.template operator()<1>();
  }
}

// rows_to_dense moves bytes: the widest of 16/8/4/2/1 bytes that divides a row and both
// base addresses.
inline int dense_copy_unit(int64_t row_bytes, const void* src, const void* dst) {
  for (int unit : {16, 8, 4, 2})
    if (row_bytes % unit == 0 && is_aligned(src, unit) && is_aligned(dst, unit)) return unit;
  return 1;
}

// Whether the embedding_bag backward's short-run schedule (one group walks several runs
// with their rows in flight together) can serve a launch: no run is cut into segments (it
// writes every row gradient directly) and rows are of at most 128 accesses (groups of one
// warp or less, with the segment kernel's lane split; wider rows give a group enough bytes
// per position anyway).
// Host and device: a launch with its counts on the device decides there (the backward
// kernels, BackwardArgs::both_schedules).
constexpr int64_t kShortRunMaxAccesses = 128;
MEMORY_EXT_HD bool short_run_backward_fits(int64_t n_runs, int64_t n_segments, int64_t n_long_runs,
                                           int64_t accesses_per_row) {
  return n_runs > 0 && n_long_runs == 0 && n_segments == n_runs &&
         accesses_per_row <= kShortRunMaxAccesses;
}

// Whether the backward takes it: where it fits and runs average at most
// kShortRunMeanLookups positions (lookups counts the bad ones too). Longer runs share the
// segment kernel's setup among many positions already, and its one group per run spreads
// hot runs better than units of consecutive runs do.
constexpr int64_t kShortRunMeanLookups = 4;
MEMORY_EXT_HD bool use_short_run_backward(int64_t n_runs, int64_t n_segments, int64_t n_long_runs,
                                          int64_t lookups, int64_t accesses_per_row) {
  return short_run_backward_fits(n_runs, n_segments, n_long_runs, accesses_per_row) &&
         lookups <= kShortRunMeanLookups * n_runs;
}

// What the backward does once the row grouping reports its lowest bad position.
enum class BadLookups {
  kNone,   // every index in range
  kRaise,  // index checks on: the op raises the CPU kernels' error
  kSkip,   // checks off: bad lookups add nothing, and their weight gradient is zero, so the
           // weight gradient is zero-filled before the kernel (which never writes them)
};

inline BadLookups bad_lookup_action(int64_t first_bad, bool index_checks) {
  if (first_bad < 0) return BadLookups::kNone;
  return index_checks ? BadLookups::kRaise : BadLookups::kSkip;
}

}  // namespace memory_ext::cuda

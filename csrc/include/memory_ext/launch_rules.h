// Host-side launch decisions of the CUDA ops that depend only on sizes, addresses and
// flags, kept as pure functions (torch- and CUDA-free) so the CPU tests check them
// (tests/launch_rules_test.cpp) and the emulations launch what the launchers would.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>

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

// rows_to_dense moves bytes: the widest of 16/8/4/2/1 bytes that divides a row and both
// base addresses.
inline int dense_copy_unit(int64_t row_bytes, const void* src, const void* dst) {
  for (int unit : {16, 8, 4, 2})
    if (row_bytes % unit == 0 && is_aligned(src, unit) && is_aligned(dst, unit)) return unit;
  return 1;
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

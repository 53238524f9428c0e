// Transparent huge pages for large CPU tensors. Large outputs (gradients of big tables)
// spend most of their first write in page faults: 4 KiB at a time, one fault per page.
// Asking for transparent huge pages on the fresh allocation before it is touched cuts that
// cost several-fold (800 MB: 190 ms -> 37 ms measured on a 2-core machine), and the kernels'
// large outputs go further (cpu/large_buffers.h: no fresh pages at all once warm). It is a
// hint: where THP is off, nothing changes.
#pragma once

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>

namespace memory_ext::cpu {

// Ask for transparent huge pages on the whole 2 MiB pages inside [data, data + bytes).
// Before the memory is first touched it makes the kernel back it with huge pages; for
// tables read at random rows it also spares a page walk per row (a 4 GiB table on 4 KiB
// pages needs 8 MiB of page-table entries, far more than any TLB or cache holds).
// The x86-64 transparent huge page, and the smallest allocation worth advising: four of
// them (smaller ones are mostly partial pages).
constexpr uintptr_t kHugePageBytes = uintptr_t(1) << 21;
constexpr uintptr_t kHugeAdviceMinBytes = 4 * kHugePageBytes;

// x rounded up to a multiple of kHugePageBytes.
constexpr uintptr_t huge_page_ceil(uintptr_t x) {
  return (x + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
}

inline void advise_huge_pages(void* data, uintptr_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= kHugeAdviceMinBytes) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
    const uintptr_t first = huge_page_ceil(begin);
    const uintptr_t last = (begin + bytes) & ~(kHugePageBytes - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace memory_ext::cpu

// Small kernels of the row grouping in embedding_bag_sort.cu: keys and positions, run
// heads and starts, per-run segment counts, and the totals. The sort and the scans between
// them are CUB's.
//
// Torch-free: compiled by embedding_bag_sort.cu and, as host C++, by the CPU emulation.
#pragma once

#include "embedding_bag_params.h"
#include "memory_ext/cuda_device.cuh"

namespace memory_ext::cuda {
namespace {

constexpr int kSortBlock = 256;

__global__ void init_info_kernel(int64_t* info) {
  if (threadIdx.x < kInfoSize) info[threadIdx.x] = threadIdx.x == kFirstBad ? -1 : 0;
}

template <typename index_t>
__global__ void __launch_bounds__(kSortBlock)
    make_keys_kernel(const index_t* __restrict__ indices, int64_t n, int64_t rows, uint32_t* keys,
                     uint32_t* positions, int64_t* info) {
  for (int64_t p = int64_t(blockIdx.x) * kSortBlock + threadIdx.x; p < n;
       p += int64_t(gridDim.x) * kSortBlock) {
    const int64_t r = indices[p];
    const bool ok = r >= 0 && r < rows;
    keys[p] = static_cast<uint32_t>(ok ? r : rows);
    positions[p] = static_cast<uint32_t>(p);
    // -1 is the largest unsigned value, so the minimum is the lowest bad position.
    if (!ok)
      atomicMin(reinterpret_cast<unsigned long long*>(info + kFirstBad),
                static_cast<unsigned long long>(p));
  }
}

__global__ void __launch_bounds__(kSortBlock)
    run_heads_kernel(const uint32_t* __restrict__ keys, int64_t n, uint32_t* heads) {
  for (int64_t p = int64_t(blockIdx.x) * kSortBlock + threadIdx.x; p < n;
       p += int64_t(gridDim.x) * kSortBlock)
    heads[p] = (p == 0 || keys[p] != keys[p - 1]) ? 1u : 0u;
}

// run_begin[run] = first position of the run; run_begin[n_runs] = n.
__global__ void __launch_bounds__(kSortBlock)
    run_begin_kernel(const uint32_t* __restrict__ heads, const uint32_t* __restrict__ run_id,
                     int64_t n, uint32_t* run_begin, int64_t* info) {
  for (int64_t p = int64_t(blockIdx.x) * kSortBlock + threadIdx.x; p < n;
       p += int64_t(gridDim.x) * kSortBlock) {
    if (heads[p]) run_begin[run_id[p]] = static_cast<uint32_t>(p);
    if (p == n - 1) {
      const uint32_t n_runs = run_id[p] + heads[p];
      run_begin[n_runs] = static_cast<uint32_t>(n);
      info[kRunsWithBad] = n_runs;
    }
  }
}

struct PlanSum {
  __host__ __device__ RunPlan operator()(const RunPlan& a, const RunPlan& b) const {
    return {a.seg + b.seg, a.long_slot + b.long_slot, a.long_rank + b.long_rank};
  }
};

// Per-run counts (zero past the last run and for the run of bad indices), to be scanned.
__global__ void __launch_bounds__(kSortBlock)
    run_counts_kernel(const uint32_t* __restrict__ keys, const uint32_t* __restrict__ run_begin,
                      const int64_t* __restrict__ info, int64_t n_entries, int64_t rows,
                      RunPlan* counts) {
  const int64_t n_runs = info[kRunsWithBad];
  for (int64_t u = int64_t(blockIdx.x) * kSortBlock + threadIdx.x; u < n_entries;
       u += int64_t(gridDim.x) * kSortBlock) {
    RunPlan c{0, 0, 0};
    if (u < n_runs) {
      const uint32_t b = run_begin[u];
      if (keys[b] != static_cast<uint32_t>(rows)) {
        const uint32_t segs =
            static_cast<uint32_t>(ceil_div(int64_t(run_begin[u + 1]) - b, kSegment));
        c = {segs, segs > 1 ? segs : 0u, segs > 1 ? 1u : 0u};
      }
    }
    counts[u] = c;
  }
}

// The exclusive scan over n + 1 entries ends with the totals (entry n counts nothing,
// since there are at most n runs).
__global__ void finish_info_kernel(const RunPlan* __restrict__ plan, int64_t n, int64_t* info) {
  if (threadIdx.x == 0) {
    info[kSegments] = plan[n].seg;
    info[kLongSlots] = plan[n].long_slot;
    info[kLongRuns] = plan[n].long_rank;
  }
}

}  // namespace
}  // namespace memory_ext::cuda

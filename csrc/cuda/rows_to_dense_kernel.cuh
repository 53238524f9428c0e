// Kernels of the CUDA rows_to_dense and its row checks, and the zeroing of the padding of
// embedding_bag_backward_padded's row gradient.
//
// Torch-free: compiled by embedding_bag.cu and, as host C++, by the CPU emulation.
#pragma once

#include <cstdint>
#include <cstring>

#include "memory_ext/cuda_device.cuh"

namespace memory_ext::cuda {
namespace {

// ---------------------------------------------------------------------------------------
// rows_to_dense: each block owns kDenseRows consecutive output rows. It finds the sparse
// rows that fall in its range by two binary searches, maps them into shared memory, and
// writes every one of its rows exactly once: a copy of its gradient or zeros.

constexpr int kDenseBlock = 256;
constexpr int kDenseRows = 32;

MEMORY_EXT_DEVICE int64_t lower_bound(const int64_t* a, int64_t n, int64_t v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (a[mid] < v)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

template <typename W>
__global__ void __launch_bounds__(kDenseBlock)
    rows_to_dense_kernel(const int64_t* __restrict__ rows, int64_t n_unique,
                         const W* __restrict__ src, W* __restrict__ dst, int64_t n_rows,
                         int64_t units) {
  __shared__ long long slot[kDenseRows];  // sparse index of each row of the block, or -1
  __shared__ int64_t range[2];
  constexpr int kWarps = kDenseBlock / kWarpSize;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int64_t r0 = int64_t(blockIdx.x) * kDenseRows; r0 < n_rows;
       r0 += int64_t(gridDim.x) * kDenseRows) {
    if (threadIdx.x < 2)
      range[threadIdx.x] = lower_bound(rows, n_unique, r0 + threadIdx.x * kDenseRows);
    if (threadIdx.x < kDenseRows) slot[threadIdx.x] = -1;
    __syncthreads();
    // Strictly ascending rows put at most kDenseRows in range; the clamp bounds the work
    // when unchecked input is not sorted.
    const int64_t u0 = range[0];
    const int64_t u1_raw = range[1] > u0 ? range[1] : u0;
    const int64_t u1 = u1_raw < u0 + kDenseRows ? u1_raw : u0 + kDenseRows;
    for (int64_t i = threadIdx.x; i < u1 - u0; i += kDenseBlock) {
      const int64_t r = rows[u0 + i];
      // atomicMax only matters for duplicate rows (unchecked bad input): it keeps the
      // result independent of scheduling.
      if (r >= r0 && r < r0 + kDenseRows) atomicMax(&slot[r - r0], static_cast<long long>(u0 + i));
    }
    __syncthreads();
    for (int i = warp; i < kDenseRows && r0 + i < n_rows; i += kWarps) {
      const long long s = slot[i];
      W* d = dst + (r0 + i) * units;
      if (s >= 0) {
        const W* sp = src + s * units;
#pragma unroll 4
        for (int64_t x = lane; x < units; x += kWarpSize) d[x] = sp[x];
      } else {
        const W zero{};
#pragma unroll 4
        for (int64_t x = lane; x < units; x += kWarpSize) d[x] = zero;
      }
    }
    __syncthreads();  // slot[] and range[] are rewritten by the next iteration
  }
}

// Zeroes rows [*count, capacity) of a (capacity, units) buffer, the count read on the
// device: the slots of embedding_bag_backward_padded's row gradient past its rows (the
// backward writes the others), so that no row is written twice. Each block owns
// kDenseRows consecutive rows, as in rows_to_dense; blocks below the count do nothing.
template <typename W>
__global__ void __launch_bounds__(kDenseBlock)
    zero_rows_from_count_kernel(const int64_t* __restrict__ count, W* __restrict__ dst,
                                int64_t capacity, int64_t units) {
  const int64_t first = *count;
  constexpr int kWarps = kDenseBlock / kWarpSize;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int64_t r0 = int64_t(blockIdx.x) * kDenseRows; r0 < capacity;
       r0 += int64_t(gridDim.x) * kDenseRows) {
    for (int i = warp; i < kDenseRows && r0 + i < capacity; i += kWarps) {
      if (r0 + i < first) continue;
      W* d = dst + (r0 + i) * units;
      const W zero{};
#pragma unroll 4
      for (int64_t x = lane; x < units; x += kWarpSize) d[x] = zero;
    }
  }
}

// Lowest u whose row is out of range or not above rows[u - 1] (the CPU kernel's order of
// checks), via atomicMin.
__global__ void __launch_bounds__(kDenseBlock)
    check_rows_kernel(const int64_t* __restrict__ rows, int64_t n, int64_t n_rows,
                      unsigned long long* first_bad) {
  for (int64_t u = int64_t(blockIdx.x) * kDenseBlock + threadIdx.x; u < n;
       u += int64_t(gridDim.x) * kDenseBlock) {
    const int64_t r = rows[u];
    if (r < 0 || r >= n_rows || (u > 0 && r <= rows[u - 1]))
      atomicMin(first_bad, static_cast<unsigned long long>(u));
  }
}

}  // namespace
}  // namespace memory_ext::cuda

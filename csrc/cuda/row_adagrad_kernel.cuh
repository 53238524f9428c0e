// Kernel of the CUDA row_adagrad_: one warp per touched row (grid-stride over the rows).
// The lanes sum strided squares of the row's gradient (lane l: elements l, l + 32, ... in
// order), a fixed xor butterfly folds the 32 partial sums, and lane 0 alone reads and
// writes the row's accumulator, then hands the step size to the other lanes, which update
// the row's elements. The order of every sum is fixed, so results repeat run to run; they
// may differ from the CPU kernel's in the last bits (the CPU sums in element order). A row
// out of range is skipped (no write out of bounds, no host sync).
//
// Torch-free: compiled by row_adagrad.cu and, as host C++, by the CPU emulation.
#pragma once

#include "memory_ext/cuda_device.cuh"
#include "memory_ext/row_adagrad_math.h"

namespace memory_ext::cuda {
namespace {

constexpr int kRowAdagradBlock = 256;
constexpr int kRowAdagradWarps = kRowAdagradBlock / kWarpSize;  // rows per block and round

// T the parameter type, S = acc_t<T> the accumulator's.
template <typename T, typename S>
__global__ void __launch_bounds__(kRowAdagradBlock)
    row_adagrad_kernel(T* __restrict__ param, S* __restrict__ sum_sq,
                       const int64_t* __restrict__ rows, const T* __restrict__ rows_grad,
                       int64_t n_unique, int64_t dim, int64_t n_rows, RowAdagradCoefficients<S> c) {
  const int lane = lane_id();
  const int64_t first = blockIdx.x * int64_t(kRowAdagradWarps) + threadIdx.x / kWarpSize;
  const int64_t stride = int64_t(gridDim.x) * kRowAdagradWarps;
  for (int64_t u = first; u < n_unique; u += stride) {
    const int64_t r = rows[u];
    if (r < 0 || r >= n_rows) continue;  // the same for every lane: the warp stays whole
    const T* g = rows_grad + u * dim;
    T* p = param + r * dim;
    S squares = 0;
    for (int64_t i = lane; i < dim; i += kWarpSize) {
      const S gi = static_cast<S>(to_acc(g[i]));
      squares += gi * gi;
    }
    squares = group_sum<kWarpSize>(kFullMask, squares);
    // One lane owns the accumulator: no lane can read it after another has written it.
    S step = 0;
    if (lane == 0) {
      S s = sum_sq[r];
      step = row_adagrad_accumulate(s, squares, dim, c);
      sum_sq[r] = s;
    }
    step = __shfl_sync(kFullMask, step, 0);
    for (int64_t i = lane; i < dim; i += kWarpSize) {
      const S pi = static_cast<S>(to_acc(p[i]));
      p[i] = from_acc<T>(row_adagrad_element(pi, static_cast<S>(to_acc(g[i])), step, c));
    }
  }
}

}  // namespace
}  // namespace memory_ext::cuda

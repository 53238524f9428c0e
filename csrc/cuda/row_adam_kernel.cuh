// Kernel of the CUDA row_adam_: one thread per element of the touched rows (grid-stride),
// the per-element math of the CPU kernel (memory_ext/row_adam_math.h). A row out of range
// is skipped (no write out of bounds, no host sync).
//
// Torch-free: compiled by row_adam.cu and, as host C++, by the CPU emulation.
#pragma once

#include "memory_ext/cuda_device.cuh"
#include "memory_ext/row_adam_math.h"

namespace memory_ext::cuda {
namespace {

constexpr int kRowAdamBlock = 256;

// T the parameter type, S = acc_t<T> the optimizer state's.
template <typename T, typename S>
__global__ void __launch_bounds__(kRowAdamBlock)
    row_adam_kernel(T* __restrict__ param, S* __restrict__ exp_avg, S* __restrict__ exp_avg_sq,
                    const int64_t* __restrict__ rows, const T* __restrict__ rows_grad,
                    int64_t n_unique, int64_t dim, int64_t n_rows, RowAdamCoefficients<S> c) {
  const int64_t total = n_unique * dim;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t u = e / dim, i = e - u * dim;
    const int64_t r = rows[u];
    if (r < 0 || r >= n_rows) continue;
    const int64_t at = r * dim + i;
    S m = exp_avg[at], v = exp_avg_sq[at];
    const S p = static_cast<S>(to_acc(param[at]));
    const S g = static_cast<S>(to_acc(rows_grad[e]));
    const S out = row_adam_element(p, g, m, v, c);
    exp_avg[at] = m;
    exp_avg_sq[at] = v;
    param[at] = from_acc<T>(out);
  }
}

}  // namespace
}  // namespace memory_ext::cuda

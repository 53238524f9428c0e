// CUDA row_adam_: lazy AdamW over the rows of a sparse gradient, one thread per element
// of the touched rows (grid-stride), the same per-element math as the CPU kernel
// (memory_ext/row_adam_math.h). Rows must be unique, which a coalesced gradient
// guarantees; a row out of range is skipped (no write out of bounds, no host sync).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "memory_ext/checks.h"
#include "memory_ext/cuda_utils.cuh"
#include "memory_ext/row_adam_math.h"

namespace memory_ext {
namespace {

template <typename T, typename S>
__global__ void row_adam_kernel(T* __restrict__ param, S* __restrict__ exp_avg,
                                S* __restrict__ exp_avg_sq, const int64_t* __restrict__ rows,
                                const T* __restrict__ rows_grad, int64_t U, int64_t dim,
                                int64_t n_rows, RowAdamCoefficients<S> c) {
  const int64_t total = U * dim;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t u = e / dim, i = e - u * dim;
    const int64_t r = rows[u];
    if (r < 0 || r >= n_rows) continue;
    const int64_t at = r * dim + i;
    S m = exp_avg[at], v = exp_avg_sq[at];
    const S p = static_cast<S>(cuda::to_acc(param[at]));
    const S g = static_cast<S>(cuda::to_acc(rows_grad[e]));
    const S out = row_adam_element(p, g, m, v, c);
    exp_avg[at] = m;
    exp_avg_sq[at] = v;
    param[at] = cuda::from_acc<T>(out);
  }
}

void row_adam_cuda(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                   const at::Tensor& rows_, const at::Tensor& rows_grad_, double lr, double beta1,
                   double beta2, double eps, double weight_decay, int64_t step) {
  check_row_adam_args(param, exp_avg, exp_avg_sq, rows_, rows_grad_, beta1, beta2, step);
  const c10::cuda::CUDAGuard guard(param.device());
  const auto rows = rows_.contiguous();
  const auto rows_grad = rows_grad_.contiguous();
  const int64_t U = rows.size(0), dim = param.size(1);
  if (U == 0 || dim == 0) return;
  constexpr int kThreads = 256;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  cuda::dispatch_value_type(param.scalar_type(), "row_adam_", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using S = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const auto c = RowAdamCoefficients<S>::make(lr, beta1, beta2, eps, weight_decay, step);
    row_adam_kernel<T, S><<<cuda::grid_for(U * dim, kThreads), kThreads, 0, stream>>>(
        reinterpret_cast<T*>(param.data_ptr()), exp_avg.data_ptr<S>(), exp_avg_sq.data_ptr<S>(),
        rows.data_ptr<int64_t>(), reinterpret_cast<const T*>(rows_grad.data_ptr()), U, dim,
        param.size(0), c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(memory, CUDA, m) { m.impl("row_adam_", &row_adam_cuda); }

}  // namespace memory_ext

// CUDA row_adam_: lazy AdamW over the rows of a sparse gradient, one thread per element
// of the touched rows (grid-stride), the same per-element math as the CPU kernel
// (memory_ext/row_adam_math.h). Rows must be unique, which a coalesced gradient
// guarantees; a row out of range is skipped (no write out of bounds, no host sync).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "memory_ext/checks.h"
#include "memory_ext/cuda_utils.cuh"
#include "memory_ext/row_adam_math.h"
#include "row_adam_kernel.cuh"

namespace memory_ext {
namespace {

void row_adam_cuda(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                   const at::Tensor& rows_, const at::Tensor& rows_grad_, double lr, double beta1,
                   double beta2, double eps, double weight_decay, int64_t step) {
  check_row_adam_args(param, exp_avg, exp_avg_sq, rows_, rows_grad_, beta1, beta2, step);
  const c10::cuda::CUDAGuard guard(param.device());
  const auto rows = rows_.contiguous();
  const auto rows_grad = rows_grad_.contiguous();
  const int64_t U = rows.size(0), dim = param.size(1);
  if (U == 0 || dim == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  cuda::dispatch_value_type(param.scalar_type(), "row_adam_", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using S = acc_t<T>;
    const auto c = RowAdamCoefficients<S>::make(lr, beta1, beta2, eps, weight_decay, step);
    cuda::row_adam_kernel<T, S>
        <<<cuda::grid_for(U * dim, cuda::kRowAdamBlock), cuda::kRowAdamBlock, 0, stream>>>(
            reinterpret_cast<T*>(param.data_ptr()), exp_avg.data_ptr<S>(), exp_avg_sq.data_ptr<S>(),
            rows.data_ptr<int64_t>(), reinterpret_cast<const T*>(rows_grad.data_ptr()), U, dim,
            param.size(0), c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(memory, CUDA, m) { m.impl("row_adam_", &row_adam_cuda); }

}  // namespace memory_ext

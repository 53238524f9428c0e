// CUDA row_adagrad_: row-wise Adagrad over the rows of a sparse gradient, one warp per
// touched row (csrc/cuda/row_adagrad_kernel.cuh), the per-row math of the CPU kernel
// (memory_ext/row_adagrad_math.h). A row needs a reduction (its mean square) before any
// of its elements can move, and a warp does both without shared memory or a second pass.
// Rows must be unique, which a coalesced gradient guarantees; a row out of range is
// skipped (no write out of bounds, no host sync).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "memory_ext/checks.h"
#include "memory_ext/cuda_utils.cuh"
#include "memory_ext/row_adagrad_math.h"
#include "row_adagrad_kernel.cuh"

namespace memory_ext {
namespace {

void row_adagrad_cuda(at::Tensor& param, at::Tensor& sum_sq, const at::Tensor& rows_,
                      const at::Tensor& rows_grad_, double lr, double eps, double weight_decay) {
  check_row_adagrad_args(param, sum_sq, rows_, rows_grad_, lr, eps, weight_decay);
  const c10::cuda::CUDAGuard guard(param.device());
  const auto rows = rows_.contiguous();
  const auto rows_grad = rows_grad_.contiguous();
  const int64_t U = rows.size(0), dim = param.size(1);
  if (U == 0 || dim == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  cuda::dispatch_value_type(param.scalar_type(), "row_adagrad_", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using S = acc_t<T>;
    const auto c = RowAdagradCoefficients<S>::make(lr, eps, weight_decay);
    cuda::row_adagrad_kernel<T, S>
        <<<cuda::grid_for(U, cuda::kRowAdagradWarps), cuda::kRowAdagradBlock, 0, stream>>>(
            reinterpret_cast<T*>(param.data_ptr()), sum_sq.data_ptr<S>(), rows.data_ptr<int64_t>(),
            reinterpret_cast<const T*>(rows_grad.data_ptr()), U, dim, param.size(0), c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(memory, CUDA, m) { m.impl("row_adagrad_", &row_adagrad_cuda); }

}  // namespace memory_ext

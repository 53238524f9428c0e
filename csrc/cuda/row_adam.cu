// CUDA row_adam_ and row_adam_capturable_: lazy AdamW over the rows of a sparse gradient,
// a group of lanes per touched row moving vectors (row_adam_kernel.cuh), the same
// per-element math as the CPU kernel (memory_ext/row_adam_math.h). Rows must be unique, which a
// coalesced gradient guarantees; a row out of range is skipped (no write out of bounds, no host
// sync).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "memory_ext/checks.h"
#include "memory_ext/cuda_utils.cuh"
#include "memory_ext/launch_rules.h"
#include "memory_ext/row_adam_math.h"
#include "row_adam_kernel.cuh"

namespace memory_ext {
namespace {

// Launches row_adam_kernel over the rows; its coefficients are given (row_adam_) or, with
// step_on_device, counted on the device first (row_adam_capturable_).
void launch_row_adam(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                     const at::Tensor& rows_, const at::Tensor& rows_grad_, double lr, double beta1,
                     double beta2, double eps, double weight_decay, int64_t step,
                     at::Tensor* step_on_device) {
  const c10::cuda::CUDAGuard guard(param.device());
  const auto rows = rows_.contiguous();
  const auto rows_grad = rows_grad_.contiguous();
  const int64_t U = rows.size(0), dim = param.size(1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  cuda::dispatch_value_type(param.scalar_type(), "row_adam_", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using S = acc_t<T>;
    RowAdamCoefficients<S> given{};
    const RowAdamCoefficients<S>* on_device = nullptr;
    at::Tensor coefficients;
    if (step_on_device != nullptr) {
      // The count advances even when no row is read, as the host count of row_adam_ does.
      coefficients =
          at::empty({int64_t(sizeof(RowAdamCoefficients<S>))}, param.options().dtype(at::kByte));
      auto* counted = reinterpret_cast<RowAdamCoefficients<S>*>(coefficients.data_ptr());
      cuda::row_adam_count_kernel<S><<<1, cuda::kRowAdamCountThreads, 0, stream>>>(
          step_on_device->data_ptr<int64_t>(), counted, lr, beta1, beta2, eps, weight_decay);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      on_device = counted;
    } else {
      given = RowAdamCoefficients<S>::make(lr, beta1, beta2, eps, weight_decay, step);
    }
    if (U == 0 || dim == 0) return;
    T* p = reinterpret_cast<T*>(param.data_ptr());
    S* m = exp_avg.data_ptr<S>();
    S* v = exp_avg_sq.data_ptr<S>();
    const T* g = reinterpret_cast<const T*>(rows_grad.data_ptr());
    // The widest vector the row length and all four bases allow (param and the moments
    // may be views with a storage offset): 16, 8 or 4 bytes of state, else one element.
    constexpr int kMax = cuda::kRowAdamMaxVec<S>;
    const int vec = cuda::widest_vector(
        dim, kMax, {{p, sizeof(T)}, {m, sizeof(S)}, {v, sizeof(S)}, {g, sizeof(T)}});
    cuda::with_vector<kMax>(vec, [&]<int VEC>() {
      const int lanes_log2 = cuda::row_adam_lanes_log2(dim, VEC);
      const int64_t rows_per_block = cuda::kRowAdamBlock >> lanes_log2;
      cuda::row_adam_kernel<T, S, VEC>
          <<<cuda::grid_for(U, rows_per_block), cuda::kRowAdamBlock, 0, stream>>>(
              p, m, v, rows.data_ptr<int64_t>(), g, U, dim, param.size(0), lanes_log2, given,
              on_device);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void row_adam_cuda(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                   const at::Tensor& rows, const at::Tensor& rows_grad, double lr, double beta1,
                   double beta2, double eps, double weight_decay, int64_t step) {
  check_row_adam_args(param, exp_avg, exp_avg_sq, rows, rows_grad, beta1, beta2, step);
  launch_row_adam(param, exp_avg, exp_avg_sq, rows, rows_grad, lr, beta1, beta2, eps, weight_decay,
                  step, nullptr);
}

// The count is trusted: it is read on the device only (a count below 0, which only a
// tampered optimizer state holds, would give infinite or NaN coefficients; the CPU kernel
// checks it).
void row_adam_capturable_cuda(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                              at::Tensor& step, const at::Tensor& rows, const at::Tensor& rows_grad,
                              double lr, double beta1, double beta2, double eps,
                              double weight_decay) {
  check_row_adam_capturable_args(param, exp_avg, exp_avg_sq, step, rows, rows_grad, beta1, beta2);
  launch_row_adam(param, exp_avg, exp_avg_sq, rows, rows_grad, lr, beta1, beta2, eps, weight_decay,
                  0, &step);
}

}  // namespace

TORCH_LIBRARY_IMPL(memory, CUDA, m) {
  m.impl("row_adam_", &row_adam_cuda);
  m.impl("row_adam_capturable_", &row_adam_capturable_cuda);
}

}  // namespace memory_ext

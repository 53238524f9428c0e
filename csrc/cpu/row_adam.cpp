// CPU row_adam_ and row_adam_capturable_: lazy AdamW over the rows of a sparse gradient.
// Each touched row is updated by one thread, element by element, with no reduction
// anywhere, so the result does not depend on the thread count. Rows must be unique (a coalesced
// gradient).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "memory_ext/checks.h"
#include "memory_ext/row_adam_math.h"
#include "row_math.h"

namespace memory_ext {
namespace {

// The parameter and moment rows are prefetched this many rows ahead, into L2: three rows
// of many lines each a row ask for more lines than L1 has fill buffers, so L1 prefetches a
// few rows ahead stalled the loads. Measured at 2^20 x 256 fp32, 232k rows a step, on a
// 2-core AMD EPYC: the step 142-175 ms with L1 prefetches 4 rows ahead, 106-109 ms with
// L2 ones 12 ahead (8-24 alike; an L1 prefetch of the next row on top, or of the gradient
// row, no better).
constexpr int64_t kAhead = 12;

// One row; restrict-qualified so that the loop vectorises (sqrt and divide included), and
// never fused into multiply-adds, so that every CPU rounds like the CUDA kernel.
template <typename scalar_t, typename state_t>
MEMORY_EXT_CLONES MEMORY_EXT_NO_FP_CONTRACT void update_row(
    scalar_t* __restrict p, state_t* __restrict m, state_t* __restrict v,
    const scalar_t* __restrict g, int64_t dim, const RowAdamCoefficients<state_t> c) {
  for (int64_t i = 0; i < dim; ++i) {
    p[i] = static_cast<scalar_t>(
        row_adam_element(static_cast<state_t>(p[i]), static_cast<state_t>(g[i]), m[i], v[i], c));
  }
}

// The update of the (checked) rows with the coefficients of step count `step`; rule names
// the op in errors about the rows.
void update_rows(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                 const at::Tensor& rows_, const at::Tensor& rows_grad_, double lr, double beta1,
                 double beta2, double eps, double weight_decay, int64_t step,
                 const SparseRowsRule& rule) {
  const auto rows = rows_.contiguous();
  const auto rows_grad = rows_grad_.contiguous();
  const int64_t n_rows = param.size(0), dim = param.size(1);
  const auto* R = rows.const_data_ptr<int64_t>();
  // -1 padding after the rows (a fixed-size gradient) is skipped.
  const int64_t U = check_padded_sparse_rows(rule, R, rows.size(0), n_rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, param.scalar_type(), "row_adam_cpu", [&] {
        using state_t = acc_t<scalar_t>;
        const auto c =
            RowAdamCoefficients<state_t>::make(lr, beta1, beta2, eps, weight_decay, step);
        scalar_t* P = param.mutable_data_ptr<scalar_t>();
        state_t* M = exp_avg.mutable_data_ptr<state_t>();
        state_t* V = exp_avg_sq.mutable_data_ptr<state_t>();
        const scalar_t* G = rows_grad.const_data_ptr<scalar_t>();
        at::parallel_for(0, U, 64, [&](int64_t u0, int64_t u1) {
          for (int64_t u = u0; u < u1; ++u) {
            // The rows are scattered over the table: ask for the parameter and moment rows
            // ahead so that their misses overlap the rows before them.
            if (u + kAhead < u1) {
              const int64_t ahead = R[u + kAhead] * dim;
              cpu::prefetch_row<cpu::PrefetchTo::L2>(P + ahead, dim * int64_t(sizeof(scalar_t)));
              cpu::prefetch_row<cpu::PrefetchTo::L2>(M + ahead, dim * int64_t(sizeof(state_t)));
              cpu::prefetch_row<cpu::PrefetchTo::L2>(V + ahead, dim * int64_t(sizeof(state_t)));
            }
            update_row(P + R[u] * dim, M + R[u] * dim, V + R[u] * dim, G + u * dim, dim, c);
          }
        });
      });
}

void row_adam_cpu(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                  const at::Tensor& rows, const at::Tensor& rows_grad, double lr, double beta1,
                  double beta2, double eps, double weight_decay, int64_t step) {
  check_row_adam_args(param, exp_avg, exp_avg_sq, rows, rows_grad, beta1, beta2, step);
  update_rows(param, exp_avg, exp_avg_sq, rows, rows_grad, lr, beta1, beta2, eps, weight_decay,
              step, kRowAdamRows);
}

// As row_adam_, with the step count kept in a tensor that the call advances by one (the
// count after it is the one the bias correction uses). Checked before anything changes:
// on a bad argument neither the count nor the rows move.
void row_adam_capturable_cpu(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                             at::Tensor& step, const at::Tensor& rows, const at::Tensor& rows_grad,
                             double lr, double beta1, double beta2, double eps,
                             double weight_decay) {
  check_row_adam_capturable_args(param, exp_avg, exp_avg_sq, step, rows, rows_grad, beta1, beta2);
  int64_t& count = *step.mutable_data_ptr<int64_t>();
  TORCH_CHECK(count >= 0, "memory.row_adam_capturable_: step (the count of steps taken) must be ",
              ">= 0 before the call, got ", count);
  update_rows(param, exp_avg, exp_avg_sq, rows, rows_grad, lr, beta1, beta2, eps, weight_decay,
              count + 1, kRowAdamCapturableRows);
  ++count;
}

}  // namespace

TORCH_LIBRARY_IMPL(memory, CPU, m) {
  m.impl("row_adam_", &row_adam_cpu);
  m.impl("row_adam_capturable_", &row_adam_capturable_cpu);
}

}  // namespace memory_ext

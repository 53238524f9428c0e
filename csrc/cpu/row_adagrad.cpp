// CPU row_adagrad_: row-wise Adagrad over the rows of a sparse gradient. Each touched row
// is updated by one thread, which sums the row's squared gradient in order (j = 0..dim-1)
// before updating its elements, so the result does not depend on the thread count. Rows
// must be unique (a coalesced gradient).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "memory_ext/checks.h"
#include "memory_ext/row_adagrad_math.h"
#include "row_math.h"

namespace memory_ext {
namespace {

constexpr int64_t kAhead = 4;  // rows prefetched ahead

// One row: its sum of squares in order (a reduction the compiler may not reorder, so it
// stays one sequential chain), then the element update, which vectorises. Never fused
// into multiply-adds, so that the bits do not depend on the CPU's instruction set.
template <typename scalar_t, typename state_t>
MEMORY_EXT_CLONES MEMORY_EXT_NO_FP_CONTRACT void update_row(
    scalar_t* __restrict p, state_t* __restrict sum_sq, const scalar_t* __restrict g, int64_t dim,
    const RowAdagradCoefficients<state_t> c) {
  state_t squares = 0;
  for (int64_t i = 0; i < dim; ++i) {
    const state_t gi = static_cast<state_t>(g[i]);
    squares += gi * gi;
  }
  const state_t step = row_adagrad_accumulate(*sum_sq, squares, dim, c);
  for (int64_t i = 0; i < dim; ++i) {
    p[i] = static_cast<scalar_t>(
        row_adagrad_element(static_cast<state_t>(p[i]), static_cast<state_t>(g[i]), step, c));
  }
}

void row_adagrad_cpu(at::Tensor& param, at::Tensor& sum_sq, const at::Tensor& rows_,
                     const at::Tensor& rows_grad_, double lr, double eps, double weight_decay) {
  check_row_adagrad_args(param, sum_sq, rows_, rows_grad_, lr, eps, weight_decay);
  const auto rows = rows_.contiguous();
  const auto rows_grad = rows_grad_.contiguous();
  const int64_t n_rows = param.size(0), dim = param.size(1);
  const auto* R = rows.const_data_ptr<int64_t>();
  // -1 padding after the rows (a fixed-size gradient) is skipped.
  const int64_t U = check_padded_sparse_rows(kRowAdagradRows, R, rows.size(0), n_rows);
  // A row of width 0 has no mean square: nothing to update.
  if (U == 0 || dim == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, param.scalar_type(), "row_adagrad_cpu", [&] {
        using state_t = acc_t<scalar_t>;
        const auto c = RowAdagradCoefficients<state_t>::make(lr, eps, weight_decay);
        scalar_t* P = param.mutable_data_ptr<scalar_t>();
        state_t* S = sum_sq.mutable_data_ptr<state_t>();
        const scalar_t* G = rows_grad.const_data_ptr<scalar_t>();
        at::parallel_for(0, U, 64, [&](int64_t u0, int64_t u1) {
          for (int64_t u = u0; u < u1; ++u) {
            // The rows are scattered over the table: ask for the parameter row and its
            // accumulator a few rows ahead so that their loads overlap this row's arithmetic.
            if (u + kAhead < u1) {
              const int64_t ahead = R[u + kAhead];
              cpu::prefetch_row(P + ahead * dim, dim * int64_t(sizeof(scalar_t)));
              cpu::prefetch_row(S + ahead, int64_t(sizeof(state_t)));
            }
            update_row(P + R[u] * dim, S + R[u], G + u * dim, dim, c);
          }
        });
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(memory, CPU, m) { m.impl("row_adagrad_", &row_adagrad_cpu); }

}  // namespace memory_ext

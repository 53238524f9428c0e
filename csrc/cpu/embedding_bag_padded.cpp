// CPU embedding_bag_backward_padded: the sparse backward, its outputs padded to the
// capacity min(lookups, rows) (see csrc/ops.cpp). The CPU gains nothing from the fixed
// size (sizing an output costs it no synchronisation); the op is here so that a fixed-size
// step runs, and is tested, on every device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "embedding_bag_cpu.h"
#include "memory_ext/checks.h"

namespace memory_ext {
namespace {

constexpr const char* kOp = "embedding_bag_backward_padded";

// The sparse backward of the lookups whose index is not -1. Where some are -1, the others
// become bags of one (their grad_out row repeated), in flat position order: each row's
// terms are then summed in the same order as without the padding, so the bits are the same.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_without_padding(const at::Tensor& grad_out,
                                                                        const at::Tensor& values,
                                                                        const at::Tensor& indices,
                                                                        const at::Tensor& weights,
                                                                        bool need_weights_grad) {
  const at::Tensor flat = indices.reshape({-1});
  const at::Tensor present = flat.ne(-1);
  const at::Tensor kept = present.nonzero().squeeze(1);
  if (kept.size(0) == flat.size(0))
    return cpu::sparse_backward(grad_out, values, indices, weights, need_weights_grad, kOp);
  // Bad indices reported at their place in the caller's indices, not the bags of one.
  const at::Tensor bad = present.logical_and(flat.lt(0).logical_or(flat.ge(values.size(0))));
  if (bad.any().item<bool>()) {
    const int64_t pos = bad.nonzero()[0][0].item<int64_t>();
    fail_index_out_of_range(kOp, pos, indices.size(1), flat[pos].item<int64_t>(), values.size(0));
  }
  const at::Tensor tokens = kept.div(indices.size(1), "floor");
  auto [rows, rows_grad, kept_weights_grad] = cpu::sparse_backward(
      grad_out.index_select(0, tokens), values, flat.index_select(0, kept).unsqueeze(1),
      weights.reshape({-1}).index_select(0, kept).unsqueeze(1), need_weights_grad, kOp);
  if (!need_weights_grad) return {rows, rows_grad, kept_weights_grad};
  at::Tensor weights_grad = at::zeros({flat.size(0)}, weights.options());
  weights_grad.index_copy_(0, kept, kept_weights_grad.reshape({-1}));
  return {rows, rows_grad, weights_grad.view(indices.sizes())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> embedding_bag_backward_padded_cpu(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& weights, bool need_weights_grad) {
  check_embedding_bag_backward_args(grad_out, values, indices, weights, kOp);
  auto [rows, rows_grad, weights_grad] =
      backward_without_padding(grad_out, values, indices, weights, need_weights_grad);
  const int64_t capacity = std::min(indices.numel(), values.size(0));
  const int64_t count = rows.size(0);
  at::Tensor padded_rows = at::full({capacity}, -1, rows.options());
  padded_rows.narrow(0, 0, count).copy_(rows);
  // The rows' gradients, then zeros: each slot written once.
  at::Tensor padded_grad = at::empty({capacity, rows_grad.size(1)}, rows_grad.options());
  padded_grad.narrow(0, 0, count).copy_(rows_grad);
  padded_grad.narrow(0, count, capacity - count).zero_();
  return {padded_rows, padded_grad, weights_grad,
          at::scalar_tensor(count, rows.options().dtype(at::kLong))};
}

}  // namespace

TORCH_LIBRARY_IMPL(memory, CPU, m) {
  m.impl("embedding_bag_backward_padded", &embedding_bag_backward_padded_cpu);
}

}  // namespace memory_ext

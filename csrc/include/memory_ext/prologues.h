// The shared start of the CPU and CUDA ops, after their argument checks: contiguous
// inputs and the outputs both backends allocate the same way, so the two cannot drift
// apart in shape, dtype or the handling of empty inputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>

#include "memory_ext/checks.h"

namespace memory_ext {

// embedding_bag_backward, checked by check_embedding_bag_backward_args.
struct EmbeddingBagBackwardInputs {
  at::Tensor grad_out;      // (tokens, dim) contiguous, in the values' dtype
  at::Tensor values;        // (rows, dim) contiguous
  at::Tensor indices;       // (tokens, bag) contiguous
  at::Tensor weights;       // (tokens, bag) contiguous
  at::Tensor weights_grad;  // (tokens, bag) uninitialised, or (0,) when not needed
  bool need_weights_grad;

  bool no_lookups() const { return indices.numel() == 0; }

  // The result when there are no lookups: no rows touched.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> no_lookups_result() const {
    return {at::empty({0}, indices.options().dtype(at::kLong)),
            at::empty({0, values.size(1)}, values.options()), weights_grad};
  }
};

inline EmbeddingBagBackwardInputs embedding_bag_backward_inputs(const at::Tensor& grad_out,
                                                                const at::Tensor& values,
                                                                const at::Tensor& indices,
                                                                const at::Tensor& weights,
                                                                bool need_weights_grad) {
  EmbeddingBagBackwardInputs in;
  in.values = values.contiguous();
  in.indices = indices.contiguous();
  in.weights = weights.contiguous();
  in.grad_out = grad_out.to(in.values.scalar_type()).contiguous();
  in.weights_grad = need_weights_grad ? at::empty(in.indices.sizes(), in.weights.options())
                                      : at::empty({0}, in.weights.options());
  in.need_weights_grad = need_weights_grad;
  return in;
}

// quantized_embedding_bag, checked by check_quantized_embedding_bag_args: contiguous
// inputs, the codes per row (dim) and the bytes after them (tail: scale, and bias for uint8).
// Each backend allocates its (tokens, dim) output its own way.
struct QuantizedBagInputs {
  at::Tensor packed, indices, weights;
  int64_t dim, tail;
};

inline QuantizedBagInputs quantized_bag_inputs(const at::Tensor& packed, const at::Tensor& indices,
                                               const at::Tensor& weights, c10::string_view codes) {
  const int64_t tail = quantized_row_tail_bytes(codes);
  return {packed.contiguous(), indices.contiguous(), weights.contiguous(), packed.size(1) - tail,
          tail};
}

// pk_topk's outputs, checked by check_pk_topk_args: scores (tokens, heads, k) in the
// accumulation dtype and indices (tokens, heads, k) int64, uninitialised.
inline std::tuple<at::Tensor, at::Tensor> pk_topk_outputs(const at::Tensor& query, int64_t k) {
  const int64_t tokens = query.size(0), heads = query.size(1);
  return {at::empty({tokens, heads, k}, query.options().dtype(acc_dtype(query.scalar_type()))),
          at::empty({tokens, heads, k}, query.options().dtype(at::kLong))};
}

}  // namespace memory_ext

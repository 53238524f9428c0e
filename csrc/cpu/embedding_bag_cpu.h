// The CPU embedding_bag kernels that other CPU ops of the family build on.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace memory_ext::cpu {

// embedding_bag_backward's CPU kernel (rows, rows_grad, weights_grad), its errors naming op.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_backward(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& weights, bool need_weights_grad, const char* op);

}  // namespace memory_ext::cpu

// pk_topk by sorting (csrc/pk_topk_by_sorting.cpp): ATen ops only, so it runs on every
// device and takes any k <= n_keys. The CUDA pk_topk calls it when k is too large for the
// shared memory of its fused kernel.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace memory_ext {

std::tuple<at::Tensor, at::Tensor> pk_topk_by_sorting(const at::Tensor& query,
                                                      const at::Tensor& keys, int64_t k);

}  // namespace memory_ext

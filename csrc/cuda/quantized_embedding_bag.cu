// CUDA quantized_embedding_bag: the launcher of the kernel in
// quantized_embedding_bag_kernel.cuh (a warp per bag and 128-column tile), and the index
// check: with checks on, the lowest bad position is reported as the CPU kernel reports it
// (one host synchronisation), or in "async" mode recorded for memory_ext.ops.check_errors().
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "async_index_errors.h"
#include "memory_ext/checks.h"
#include "memory_ext/cuda_utils.cuh"
#include "memory_ext/index_checks.h"
#include "memory_ext/prologues.h"
#include "quantized_embedding_bag_kernel.cuh"

namespace memory_ext {
namespace {

template <bool kE4M3>
void launch(c10::ScalarType out_dtype, const cuda::QuantizedBagArgs& a, cudaStream_t stream) {
  using cuda::kQuantBlock;
  using cuda::quantized_bag_kernel;
  const int64_t items = a.tokens * ceil_div(a.dim, cuda::kQuantTile);
  const unsigned int grid = cuda::grid_for(items, cuda::kQuantWarpsPerBlock);
  switch (out_dtype) {
    case c10::ScalarType::Float:
      quantized_bag_kernel<kE4M3, float><<<grid, kQuantBlock, 0, stream>>>(a);
      break;
    case c10::ScalarType::BFloat16:
      quantized_bag_kernel<kE4M3, __nv_bfloat16><<<grid, kQuantBlock, 0, stream>>>(a);
      break;
    default:
      quantized_bag_kernel<kE4M3, __half><<<grid, kQuantBlock, 0, stream>>>(a);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor quantized_embedding_bag_cuda(const at::Tensor& packed_, const at::Tensor& indices_,
                                        const at::Tensor& weights_, c10::string_view codes,
                                        c10::ScalarType out_dtype, bool check_indices) {
  check_quantized_embedding_bag_args(packed_, indices_, weights_, codes, out_dtype);
  const c10::cuda::CUDAGuard guard(packed_.device());
  const auto [packed, indices, weights, dim, tail] =
      quantized_bag_inputs(packed_, indices_, weights_, codes);
  auto out = at::empty({indices.size(0), dim}, packed.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  if (indices.size(1) == 0) return out.zero_();

  const IndexCheckMode mode = check_indices ? index_check_mode() : IndexCheckMode::kOff;
  const bool check = mode != IndexCheckMode::kOff;
  at::Tensor first_bad;
  if (check) first_bad = at::full({1}, -1, packed.options().dtype(at::kLong));
  cuda::QuantizedBagArgs a{};
  a.packed = packed.const_data_ptr<uint8_t>();
  a.indices = indices.const_data_ptr();
  a.weights = weights.const_data_ptr<float>();
  a.out = out.mutable_data_ptr();
  a.first_bad = check ? reinterpret_cast<unsigned long long*>(first_bad.mutable_data_ptr<int64_t>())
                      : nullptr;
  a.tokens = indices.size(0);
  a.bag = indices.size(1);
  a.rows = packed.size(0);
  a.row_bytes = packed.size(1);
  a.dim = dim;
  a.idx64 = indices.scalar_type() == at::kLong;
  a.has_bias = tail == 8;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (tail == 8)
    launch<false>(out_dtype, a, stream);
  else
    launch<true>(out_dtype, a, stream);
  if (mode == IndexCheckMode::kAsync)
    cuda::record_bad_lookup(cuda::RecordedOp::kQuantizedEmbeddingBag, first_bad, indices, a.rows,
                            stream);
  if (mode == IndexCheckMode::kSync) {
    const int64_t bad = first_bad.item<int64_t>();  // the one synchronisation
    if (bad >= 0)
      fail_index_out_of_range("quantized_embedding_bag", bad, a.bag,
                              indices.reshape({-1})[bad].item<int64_t>(), a.rows);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(memory, CUDA, m) {
  m.impl("quantized_embedding_bag", &quantized_embedding_bag_cuda);
}

}  // namespace memory_ext

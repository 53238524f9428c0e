// CUDA kernel of quantized_embedding_bag (the contract is in csrc/ops.cpp; the CPU kernel,
// csrc/cpu/quantized_embedding_bag.cpp, is the reference).
//
// A warp owns one (bag, tile of 128 columns) item: each lane reads 4 consecutive codes of
// a row (one warp reads 128 consecutive bytes), the row's scale and bias are read by every
// lane from the row's tail (one broadcast load), and kRowsInFlight rows are loaded before
// any is summed so that the memory system sees independent requests. Accumulates in
// float32 in bag order; each output element is stored once.
//
// Index validation as the float bag's CUDA kernel: a bad lookup adds nothing, and with
// index checks on the lowest bad position is recorded and the op raises the CPU error.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <torch/library.h>

#include "memory_ext/checks.h"
#include "memory_ext/cuda_utils.cuh"
#include "memory_ext/index_checks.h"

namespace memory_ext {
namespace {

constexpr int kBlock = 256;
constexpr int kWarpsPerBlock = kBlock / 32;
constexpr int kColsPerLane = 4;
constexpr int kTile = 32 * kColsPerLane;
constexpr int kRowsInFlight = 8;

struct QuantizedArgs {
  const uint8_t* packed;
  const void* indices;
  const float* weights;
  void* out;
  unsigned long long* first_bad;
  int64_t tokens, bag, rows, row_bytes, dim;
  bool idx64, has_bias;
};

__device__ float load_tail_float(const uint8_t* p) {
  // Row tails are 4-byte aligned only when dim is a multiple of 4: assemble the bytes.
  const uint32_t bits =
      uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
  return __uint_as_float(bits);
}

template <bool kE4M3>
__device__ float decode(uint8_t code) {
  if constexpr (kE4M3) {
    __nv_fp8_e4m3 f;
    f.__x = code;
    return static_cast<float>(f);
  } else {
    return static_cast<float>(code);
  }
}

template <typename out_t>
__device__ out_t from_float(float x) {
  if constexpr (std::is_same_v<out_t, float>) return x;
  if constexpr (std::is_same_v<out_t, __nv_bfloat16>) return __float2bfloat16_rn(x);
  if constexpr (std::is_same_v<out_t, __half>) return __float2half_rn(x);
}

template <bool kE4M3, typename out_t>
__global__ void __launch_bounds__(kBlock) quantized_bag_kernel(const QuantizedArgs a) {
  const int lane = threadIdx.x % 32;
  const int64_t n_tiles = (a.dim + kTile - 1) / kTile;
  const int64_t n_items = a.tokens * n_tiles;
  out_t* out = static_cast<out_t*>(a.out);
  for (int64_t item = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; item < n_items;
       item += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t t = item / n_tiles;
    const int64_t col0 = (item - t * n_tiles) * kTile + lane * kColsPerLane;
    // -0 is the sum's identity (-0 + x = x for every x, -0 included): a bag of -0 rows
    // stays -0, as in the float gather; padded rows below add -0 for the same reason.
    float acc[kColsPerLane];
#pragma unroll
    for (int c = 0; c < kColsPerLane; ++c) acc[c] = -0.0f;
    float bias_sum = 0.0f;
    for (int64_t j0 = 0; j0 < a.bag; j0 += kRowsInFlight) {
      const uint8_t* row[kRowsInFlight];
      float w[kRowsInFlight];
#pragma unroll
      for (int q = 0; q < kRowsInFlight; ++q) {
        const int64_t j = j0 + q, pos = t * a.bag + j;
        row[q] = nullptr;
        w[q] = 0.0f;
        if (j >= a.bag) continue;
        const int64_t r = cuda::load_index(a.indices, a.idx64, pos);
        if (r >= 0 && r < a.rows) {
          row[q] = a.packed + r * a.row_bytes;
          w[q] = a.weights[pos];
        } else if (a.first_bad != nullptr && lane == 0) {
          atomicMin(a.first_bad, static_cast<unsigned long long>(pos));
        }
      }
      uint8_t code[kRowsInFlight][kColsPerLane];
      float factor[kRowsInFlight];
#pragma unroll
      for (int q = 0; q < kRowsInFlight; ++q) {
        factor[q] = row[q] == nullptr ? -0.0f : w[q] * load_tail_float(row[q] + a.dim);
        if (row[q] != nullptr && a.has_bias) bias_sum += w[q] * load_tail_float(row[q] + a.dim + 4);
#pragma unroll
        for (int c = 0; c < kColsPerLane; ++c)
          code[q][c] = row[q] != nullptr && col0 + c < a.dim ? __ldg(row[q] + col0 + c) : 0;
      }
#pragma unroll
      for (int q = 0; q < kRowsInFlight; ++q)
#pragma unroll
        for (int c = 0; c < kColsPerLane; ++c) acc[c] += factor[q] * decode<kE4M3>(code[q][c]);
    }
#pragma unroll
    for (int c = 0; c < kColsPerLane; ++c)
      if (col0 + c < a.dim)
        out[t * a.dim + col0 + c] = from_float<out_t>(a.has_bias ? acc[c] + bias_sum : acc[c]);
  }
}

template <bool kE4M3>
void launch(c10::ScalarType out_dtype, const QuantizedArgs& a, cudaStream_t stream) {
  const int64_t items = a.tokens * ((a.dim + kTile - 1) / kTile);
  const unsigned int grid = cuda::grid_for(items, kWarpsPerBlock);
  switch (out_dtype) {
    case c10::ScalarType::Float:
      quantized_bag_kernel<kE4M3, float><<<grid, kBlock, 0, stream>>>(a);
      break;
    case c10::ScalarType::BFloat16:
      quantized_bag_kernel<kE4M3, __nv_bfloat16><<<grid, kBlock, 0, stream>>>(a);
      break;
    default:
      quantized_bag_kernel<kE4M3, __half><<<grid, kBlock, 0, stream>>>(a);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor quantized_embedding_bag_cuda(const at::Tensor& packed_, const at::Tensor& indices_,
                                        const at::Tensor& weights_, c10::string_view codes,
                                        c10::ScalarType out_dtype) {
  check_quantized_embedding_bag_args(packed_, indices_, weights_, codes, out_dtype);
  const c10::cuda::CUDAGuard guard(packed_.device());
  const int64_t tail = quantized_row_tail_bytes(codes);
  const auto packed = packed_.contiguous();
  const auto indices = indices_.contiguous();
  const auto weights = weights_.contiguous();
  const int64_t dim = packed.size(1) - tail;
  auto out = at::empty({indices.size(0), dim}, packed.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  if (indices.size(1) == 0) return out.zero_();

  const bool check = index_checks_enabled();
  at::Tensor first_bad;
  if (check) first_bad = at::full({1}, -1, packed.options().dtype(at::kLong));
  QuantizedArgs a{};
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
  if (check) {
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

// Kernel of the CUDA quantized_embedding_bag (the contract is in csrc/ops.cpp; the CPU
// kernel, csrc/cpu/quantized_embedding_bag.cpp, is the reference).
//
// A warp owns one (bag, tile of 128 columns) item: each lane reads 4 consecutive codes of
// a row (one warp reads 128 consecutive bytes), the row's scale and bias are read by every
// lane from the row's tail (one broadcast load), and kQuantRowsInFlight rows are loaded
// before any is summed so that the memory system sees independent requests. Accumulates in
// float32 in bag order with explicit fused multiply-adds (the same bits on every device and
// in the CPU emulation); each output element is stored once.
//
// Index validation as the float bag's CUDA kernel: a bad lookup adds nothing, and with
// first_bad set the lowest bad position is recorded for the launcher to report.
//
// Torch-free: compiled by quantized_embedding_bag.cu and, as host C++, by the CPU
// emulation (tests/quantized_embedding_bag_emulate.cpp).
#pragma once

#include "memory_ext/cuda_device.cuh"
#include "memory_ext/e4m3.h"

namespace memory_ext::cuda {
namespace {

constexpr int kQuantBlock = 256;
constexpr int kQuantWarpsPerBlock = kQuantBlock / kWarpSize;
constexpr int kQuantColsPerLane = 4;
constexpr int kQuantTile = kWarpSize * kQuantColsPerLane;  // columns per warp item
constexpr int kQuantRowsInFlight = 8;

struct QuantizedBagArgs {
  const uint8_t* packed;          // (rows, row_bytes): dim codes, a float32 scale, (a float32 bias)
  const void* indices;            // (tokens, bag) int64 (idx64) or int32
  const float* weights;           // (tokens, bag)
  void* out;                      // (tokens, dim) out_t
  unsigned long long* first_bad;  // null: no index check
  int64_t tokens, bag, rows, row_bytes, dim;
  bool idx64, has_bias;
};

// Row tails are 4-byte aligned only when dim is a multiple of 4: assemble the bytes.
MEMORY_EXT_DEVICE float load_tail_float(const uint8_t* p) {
  const uint32_t bits =
      uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
  return __uint_as_float(bits);
}

template <bool kE4M3>
MEMORY_EXT_DEVICE float decode_code(uint8_t code) {
  if constexpr (kE4M3)
    return e4m3_to_float(code);
  else
    return static_cast<float>(code);
}

// out_t: float, __nv_bfloat16 or __half.
template <bool kE4M3, typename out_t>
__global__ void __launch_bounds__(kQuantBlock) quantized_bag_kernel(const QuantizedBagArgs a) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t n_tiles = ceil_div(a.dim, kQuantTile);
  const int64_t n_items = a.tokens * n_tiles;
  out_t* out = static_cast<out_t*>(a.out);
  for (int64_t item = int64_t(blockIdx.x) * kQuantWarpsPerBlock + threadIdx.x / kWarpSize;
       item < n_items; item += int64_t(gridDim.x) * kQuantWarpsPerBlock) {
    const int64_t t = item / n_tiles;
    const int64_t col0 = (item - t * n_tiles) * kQuantTile + lane * kQuantColsPerLane;
    // -0 is the sum's identity (-0 + x = x for every x, -0 included): a bag of -0 rows
    // stays -0, as in the float gather; padded and bad rows add -0 for the same reason.
    float acc[kQuantColsPerLane];
#pragma unroll
    for (int c = 0; c < kQuantColsPerLane; ++c) acc[c] = -0.0f;
    float bias_sum = 0.0f;
    for (int64_t j0 = 0; j0 < a.bag; j0 += kQuantRowsInFlight) {
      const uint8_t* row[kQuantRowsInFlight];
      float w[kQuantRowsInFlight];
#pragma unroll
      for (int q = 0; q < kQuantRowsInFlight; ++q) {
        const int64_t j = j0 + q, pos = t * a.bag + j;
        row[q] = nullptr;
        w[q] = 0.0f;
        if (j >= a.bag) continue;
        const int64_t r = load_index(a.indices, a.idx64, pos);
        if (r >= 0 && r < a.rows) {
          row[q] = a.packed + r * a.row_bytes;
          w[q] = a.weights[pos];
        } else if (a.first_bad != nullptr && lane == 0) {
          atomicMin(a.first_bad, static_cast<unsigned long long>(pos));
        }
      }
      uint8_t code[kQuantRowsInFlight][kQuantColsPerLane];
      float factor[kQuantRowsInFlight];
#pragma unroll
      for (int q = 0; q < kQuantRowsInFlight; ++q) {
        factor[q] = row[q] == nullptr ? -0.0f : w[q] * load_tail_float(row[q] + a.dim);
        if (row[q] != nullptr && a.has_bias)
          bias_sum = fmaf(w[q], load_tail_float(row[q] + a.dim + 4), bias_sum);
#pragma unroll
        for (int c = 0; c < kQuantColsPerLane; ++c)
          code[q][c] = row[q] != nullptr && col0 + c < a.dim ? __ldg(row[q] + col0 + c) : 0;
      }
#pragma unroll
      for (int q = 0; q < kQuantRowsInFlight; ++q)
#pragma unroll
        for (int c = 0; c < kQuantColsPerLane; ++c)
          acc[c] = fmaf(factor[q], decode_code<kE4M3>(code[q][c]), acc[c]);
    }
#pragma unroll
    for (int c = 0; c < kQuantColsPerLane; ++c)
      if (col0 + c < a.dim)
        out[t * a.dim + col0 + c] = from_acc<out_t>(a.has_bias ? acc[c] + bias_sum : acc[c]);
  }
}

}  // namespace
}  // namespace memory_ext::cuda

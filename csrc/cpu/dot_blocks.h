// The loop our vector scoring kernels share (bf16_scores.cpp's AVX512-BF16 kernel and
// f32_scores.cpp's AVX-512 one). A block kernel scores R <= kDotTokens tokens against the
// 32 keys of two packed tiles of 16 keys, its R x 32 sums in registers; the loop reads each
// group's keys 32 at a time (two tiles, which stay in L1) against all the call's tokens,
// kDotTokens at a time.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>

namespace memory_ext::cpu {

// Tokens per block: 12 x 2 vectors of sums, two key vectors and a broadcast fill 27 of
// AVX-512's 32 vector registers.
constexpr int kDotTokens = 12;
// Keys per packed tile: one 16-lane vector of float32 sums.
constexpr int64_t kDotTileKeys = 16;

// a: R query rows a_stride elements apart; b0, b1: two packed tiles; steps: the kernel's
// steps over the half dimensions; c: R rows of 32 sums, c_stride elements apart.
template <typename T>
using DotBlock = void (*)(const T* a, int64_t a_stride, const T* b0, const T* b1, int64_t steps,
                          float* c, int64_t c_stride);

// out[g - g0][t][key] for the groups g in [g0, g1): blocks[r] scores r + 1 tokens (the
// last block of a call may be short); a packed tile holds half * kDotTileKeys values.
template <typename T>
void dot_scores(const std::array<DotBlock<T>, kDotTokens>& blocks, const T* query,
                int64_t token_stride, const T* packed, int64_t g0, int64_t g1, int64_t tokens,
                int64_t n_keys, int64_t half, int64_t steps, float* out) {
  const int64_t tile_elems = half * kDotTileKeys;
  for (int64_t g = g0; g < g1; ++g) {
    const T* group_tiles = packed + g * n_keys * half;
    for (int64_t j0 = 0; j0 < n_keys; j0 += 2 * kDotTileKeys) {
      const T* b0 = group_tiles + (j0 / kDotTileKeys) * tile_elems;
      for (int64_t t0 = 0; t0 < tokens; t0 += kDotTokens) {
        const int64_t bt = std::min<int64_t>(kDotTokens, tokens - t0);
        blocks[bt - 1](query + t0 * token_stride + g * half, token_stride, b0, b0 + tile_elems,
                       steps, out + ((g - g0) * tokens + t0) * n_keys + j0, n_keys);
      }
    }
  }
}

}  // namespace memory_ext::cpu

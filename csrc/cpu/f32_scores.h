// Half-scores of float32 queries and sub-keys with AVX-512 FMAs, for pk_topk's calls that
// score and select a tile of tokens at a time (pk_topk.cpp): float32 inputs, and float16
// or bfloat16 inputs converted to float32 (exactly) where no bf16 kernel takes them.
//
// Why not torch's GEMM, as before: its output for a block of tokens was several MiB,
// written by the GEMM and read back from L3 or memory by the selection; a tile of our own
// scores stays in L2 until it is selected from, and needs no workspace beyond it. On a
// 2-core AMD EPYC (Zen 4), 4096 tokens x 4 heads, n_keys 1024, half 128, k 32, MKL's GEMM
// also spent a fifth of its time zeroing its output and packing its inputs.
//
// Each score sums its products in ascending order of dimension with FMAs, whatever the tile
// or the thread count, so results are bitwise reproducible on one machine; they round
// differently from torch's GEMM. MEMORY_EXT_CPU_F32_DOT=0 in the environment turns the
// kernel off (pk_topk then scores every call with torch's GEMM), so that both paths can be
// tested on one machine.
#pragma once

#include <cstdint>
#include <vector>

namespace memory_ext::cpu {

// Whether f32_scores can run here: the CPU has AVX-512F, the build could target it, and
// MEMORY_EXT_CPU_F32_DOT (read once; 0 or 1) allows it.
bool f32_scores_available();

// The kernel f32_scores runs in this process: "avx512" or "none".
const char* f32_scores_kernel();

// Whether f32_scores takes this shape: n_keys a positive multiple of 32, half positive.
bool f32_scores_supports(int64_t n_keys, int64_t half);

// Rearranges the groups [g0, g1) of keys (groups, n_keys, half) contiguous, in a shape
// f32_scores_supports, into packed (room for all groups * n_keys * half values) for
// f32_scores: packed[g][tile][d][l] = keys[g][tile * 16 + l][d]. Callers split the groups
// between threads.
template <typename T>
void pack_f32_keys(const T* keys, int64_t g0, int64_t g1, int64_t n_keys, int64_t half,
                   float* packed);

// out[g - g0][t][key] = sum_d query[t][g][d] * keys[g][key][d] for the groups g in [g0, g1)
// and t < tokens, with query rows token_stride elements apart (a group's half at g * half),
// keys packed by pack_f32_keys and out (g1 - g0, tokens, n_keys) contiguous.
// Single-threaded: the caller splits the work between threads.
void f32_scores(const float* query, int64_t token_stride, const float* packed, int64_t g0,
                int64_t g1, int64_t tokens, int64_t n_keys, int64_t half, float* out);

}  // namespace memory_ext::cpu

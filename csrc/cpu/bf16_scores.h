// Half-scores of bfloat16 queries and sub-keys in float32 on the AMX tile unit (Intel Xeon
// from Sapphire Rapids on): each TDPBF16PS multiplies a 16 x 32 block of bf16 query values
// by a 32 x 16 block of sub-keys into 16 x 16 float32 sums, the products exact in float32.
// torch has no CPU matmul of bf16 inputs with a float32 result (its bf16 matmul rounds the
// result to bf16, which would change the selection), so pk_topk had converted both to
// float32 and run a float32 GEMM. Measured on a 2-core Xeon with AMX (4096 tokens x 4
// heads, n_keys 1024, half 128, k 32): pk_topk in bf16 80 -> 58 ms. (AVX512-BF16's
// vdpbf16ps, tried first, was no faster than the float32 GEMM: one instruction a cycle.)
//
// Each score sums its products in the tile unit's fixed order, whatever the block or the
// thread count, so results are bitwise reproducible. The tile unit treats bf16 subnormal
// inputs as zero, which can move a score by a subnormal times the other factor (large if
// that factor is huge): pk_topk checks its inputs (has_bf16_subnormals) and scores calls
// with any subnormal on the float32 path instead. Subnormal sums are flushed to zero, a
// change of less than 2^-126.
//
// Linux gives the tile state only to processes that ask for it (arch_prctl), and from then
// on an alternate signal stack must hold that state: sigaltstack with a smaller stack fails
// (ENOMEM), and a process whose threads already have a smaller alternate stack is refused
// (pk_topk then uses the float32 path). MEMORY_EXT_CPU_BF16_DOT=0 in the environment keeps
// the process from asking.
#pragma once

#include <cstdint>
#include <vector>

namespace memory_ext::cpu {

// Whether bf16_scores can run here: this CPU has AMX-BF16, the build could target it and
// Linux gave this process the AMX state.
// MEMORY_EXT_CPU_BF16_DOT=0 in the environment turns it off (read once), so the float32
// path can be tested on the same machine.
bool bf16_scores_available();

// Whether bf16_scores takes this shape: n_keys and half positive multiples of 32.
bool bf16_scores_supports(int64_t n_keys, int64_t half);

// Whether any of the n bf16 values (raw bits) is subnormal.
bool has_bf16_subnormals(const uint16_t* values, int64_t n);

// The sub-keys of one call rearranged for bf16_scores: groups (heads * 2) blocks of n_keys
// rows of half bf16 values, from keys (groups, n_keys, half) contiguous, a shape that
// bf16_scores_supports.
std::vector<uint16_t> pack_bf16_keys(const uint16_t* keys, int64_t groups, int64_t n_keys,
                                     int64_t half);

// out[g][t][key] = sum_d query[t][g][d] * keys[g][key][d] in float32 for the groups g in
// [g0, g1) and t < tokens, with query rows token_stride elements apart (a group's half at
// g * half), keys packed by pack_bf16_keys and out (groups, tokens, n_keys) contiguous.
// Single-threaded: the caller splits the groups between threads.
void bf16_scores(const uint16_t* query, int64_t token_stride, const uint16_t* packed, int64_t g0,
                 int64_t g1, int64_t tokens, int64_t n_keys, int64_t half, float* out);

}  // namespace memory_ext::cpu

// Half-scores of bfloat16 queries and sub-keys in float32, the products exact in float32,
// by one of two kernels:
// - on the AMX tile unit (Intel Xeon from Sapphire Rapids on): each TDPBF16PS multiplies a
//   16 x 32 block of bf16 query values by a 32 x 16 block of sub-keys into 16 x 16 float32
//   sums. Measured on a 2-core Xeon with AMX (4096 tokens x 4 heads, n_keys 1024, half 128,
//   k 32): pk_topk in bf16 80 -> 58 ms. (AVX512-BF16 was no faster there than the float32
//   GEMM: that Xeon runs two float32 FMAs a cycle and one VDPBF16PS.)
// - with AVX512-BF16 where there is no tile unit (AMD Zen 4 and later): each VDPBF16PS adds
//   two products to each of 16 float32 sums, twice a float32 FMA's work where both run one
//   instruction a cycle. Measured on a 2-core AMD EPYC (Zen 4) at the shape above:
//   pk_topk in bf16 113 -> 79 ms (against the float32 GEMM on converted inputs).
// torch has no CPU matmul of bf16 inputs with a float32 result (its bf16 matmul rounds the
// result to bf16, which would change the selection), so without these pk_topk scores the
// inputs converted to float32 (our float32 kernel, f32_scores.h, or torch's GEMM).
//
// Each score sums its products in a fixed order (the tile unit's, or per pair of dimensions
// in ascending order), whatever the block or the thread count, so results are bitwise
// reproducible on one machine; the two kernels round differently from each other. Both
// treat bf16 subnormal inputs as zero, which can move a score by a subnormal times the other
// factor (large if that factor is huge): pk_topk checks its inputs (has_bf16_subnormals)
// and scores calls with any subnormal on the float32 path instead. Subnormal sums are
// flushed to zero, a change of less than 2^-126.
//
// Linux gives the tile state only to processes that ask for it (arch_prctl), and from then
// on an alternate signal stack must hold that state: sigaltstack with a smaller stack fails
// (ENOMEM), and a process whose threads already have a smaller alternate stack is refused
// (pk_topk then uses AVX512-BF16 where the CPU has it, else the float32 path).
// MEMORY_EXT_CPU_BF16_DOT in the environment: 0 turns both kernels off (and keeps the process
// from asking for the tile state), amx or avx512_bf16 allows only that one (so that a CPU
// with both can test each), 1 or unset takes the tile unit first.
#pragma once

#include <cstdint>
#include <vector>

namespace memory_ext::cpu {

// Whether bf16_scores can run here: this CPU has AMX-BF16 (and Linux gave this process the
// AMX state) or AVX512-BF16, the build could target it, and MEMORY_EXT_CPU_BF16_DOT (read
// once; above) allows it, so that the float32 path can be tested on the same machine.
bool bf16_scores_available();

// The kernel bf16_scores runs in this process: "amx", "avx512_bf16" or "none".
const char* bf16_scores_kernel();

// Tokens that bf16_scores scores at once in this process (32 on the tile unit, 12 with
// AVX512-BF16): calls of a multiple of it waste no work on padding.
int64_t bf16_scores_block_tokens();

// Whether bf16_scores takes this shape: n_keys and half positive multiples of 32.
bool bf16_scores_supports(int64_t n_keys, int64_t half);

// Whether any of the n bf16 values (raw bits) is subnormal.
bool has_bf16_subnormals(const uint16_t* values, int64_t n);

// Rearranges the groups [g0, g1) of keys (groups, n_keys, half) contiguous, in a shape
// bf16_scores_supports, into packed (room for all groups * n_keys * half values) for
// bf16_scores. Callers split the groups between threads.
void pack_bf16_keys(const uint16_t* keys, int64_t g0, int64_t g1, int64_t n_keys, int64_t half,
                    uint16_t* packed);

// out[g - g0][t][key] = sum_d query[t][g][d] * keys[g][key][d] in float32 for the groups g
// in [g0, g1) and t < tokens, with query rows token_stride elements apart (a group's half at
// g * half), keys packed by pack_bf16_keys and out (g1 - g0, tokens, n_keys) contiguous.
// Single-threaded: the caller splits the groups between threads.
void bf16_scores(const uint16_t* query, int64_t token_stride, const uint16_t* packed, int64_t g0,
                 int64_t g1, int64_t tokens, int64_t n_keys, int64_t half, float* out);

}  // namespace memory_ext::cpu

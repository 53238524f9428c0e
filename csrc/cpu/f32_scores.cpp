// float32 half-scores for pk_topk with AVX-512 FMAs (see f32_scores.h).
#include "f32_scores.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <array>
#include <cstdlib>
#include <string>
#include <utility>

#include "dot_blocks.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MEMORY_EXT_HAS_F32_KERNEL 1
#define MEMORY_EXT_AVX512_TARGET __attribute__((target("avx512f")))
#else
#define MEMORY_EXT_HAS_F32_KERNEL 0
#endif

namespace memory_ext::cpu {
namespace {

#if MEMORY_EXT_HAS_F32_KERNEL
// R tokens x 32 keys of one group, R x 2 vectors of 16 sums in registers. Per dimension d,
// one load of each packed tile (16 keys' values of d) and a broadcast of each token's value
// (folded into the FMA as a memory operand); 2R FMAs for R + 2 loads.
template <int R>
MEMORY_EXT_AVX512_TARGET void dot_block(const float* a, int64_t a_stride, const float* b0,
                                        const float* b1, int64_t dims, float* c, int64_t c_stride) {
  __m512 sums[R][2];
  for (int r = 0; r < R; ++r) sums[r][0] = sums[r][1] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dims; ++d) {
    const __m512 k0 = _mm512_loadu_ps(b0 + d * kDotTileKeys);
    const __m512 k1 = _mm512_loadu_ps(b1 + d * kDotTileKeys);
    for (int r = 0; r < R; ++r) {
      const __m512 q = _mm512_set1_ps(a[r * a_stride + d]);
      sums[r][0] = _mm512_fmadd_ps(q, k0, sums[r][0]);
      sums[r][1] = _mm512_fmadd_ps(q, k1, sums[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(c + r * c_stride, sums[r][0]);
    _mm512_storeu_ps(c + r * c_stride + kDotTileKeys, sums[r][1]);
  }
}

template <size_t... R>
constexpr std::array<DotBlock<float>, sizeof...(R)> dot_blocks(std::index_sequence<R...>) {
  return {&dot_block<int(R) + 1>...};
}
// dot_block<r + 1> at [r]: the last block of a call may be short.
constexpr auto kDotBlocks = dot_blocks(std::make_index_sequence<kDotTokens>{});
#endif

bool f32_kernel_on() {
  static const bool on = [] {
    const char* env = std::getenv("MEMORY_EXT_CPU_F32_DOT");
    const std::string choice = env == nullptr ? "1" : env;
    TORCH_CHECK(choice == "0" || choice == "1",
                "memory.pk_topk: MEMORY_EXT_CPU_F32_DOT must be 0 or 1, got '", choice, "'");
#if MEMORY_EXT_HAS_F32_KERNEL
    return choice == "1" && __builtin_cpu_supports("avx512f");
#else
    return false;
#endif
  }();
  return on;
}

}  // namespace

bool f32_scores_available() { return f32_kernel_on(); }

const char* f32_scores_kernel() { return f32_kernel_on() ? "avx512" : "none"; }

bool f32_scores_supports(int64_t n_keys, int64_t half) {
  return n_keys > 0 && half > 0 && n_keys % (2 * kDotTileKeys) == 0;
}

template <typename T>
void pack_f32_keys(const T* keys, int64_t g0, int64_t g1, int64_t n_keys, int64_t half,
                   float* packed) {
  const int64_t tiles = n_keys / kDotTileKeys;
  float* dst = packed + g0 * n_keys * half;
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const T* src = keys + (g * n_keys + tile * kDotTileKeys) * half;
      for (int64_t d = 0; d < half; ++d)
        for (int64_t l = 0; l < kDotTileKeys; ++l) *dst++ = static_cast<float>(src[l * half + d]);
    }
}

template void pack_f32_keys(const float*, int64_t, int64_t, int64_t, int64_t, float*);
template void pack_f32_keys(const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, float*);
template void pack_f32_keys(const c10::Half*, int64_t, int64_t, int64_t, int64_t, float*);

void f32_scores(const float* query, int64_t token_stride, const float* packed, int64_t g0,
                int64_t g1, int64_t tokens, int64_t n_keys, int64_t half, float* out) {
  // pk_topk calls this only where f32_scores_available() said yes
  TORCH_INTERNAL_ASSERT(f32_kernel_on(),
                        "memory.pk_topk: the float32 scoring kernel does not run here");
#if MEMORY_EXT_HAS_F32_KERNEL
  dot_scores(kDotBlocks, query, token_stride, packed, g0, g1, tokens, n_keys, half, half, out);
#else
  (void)query, (void)token_stride, (void)packed, (void)g0, (void)g1, (void)tokens, (void)n_keys,
      (void)half, (void)out;
#endif
}

}  // namespace memory_ext::cpu

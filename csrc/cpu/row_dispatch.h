// The entry points of the CPU kernels' row loops (bag_sum, row_axpy_n, row_dot): each runs
// an AVX-512 variant where the CPU has AVX-512 and one exists for the row type, and the
// portable clones of row_math.h otherwise. A variant does the arithmetic of the clone for
// x86-64-v4 in the same order, down to which product the compiler fused into an add, so
// every bit of a result is the same (tests/test_cpu_variants.py); it differs in how rows
// are widened to float, where GCC's vectoriser does poorly from portable loops.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "row_math.h"

#if defined(MEMORY_EXT_GCC_X86_64)
#include <immintrin.h>
#endif

namespace memory_ext::cpu {

#if defined(MEMORY_EXT_GCC_X86_64)
// x86-64-v4: AVX-512 F/BW/CD/DQ/VL, the level GCC's target_clones names.
#define MEMORY_EXT_V4 __attribute__((target("arch=x86-64-v4")))
// Everything a variant calls is inlined into it, where its instructions are allowed (the
// helpers below are compiled for AVX-512 too, and always_inline would have them inlined into
// portable callers such as bag_sum_chunk, which are not).
#define MEMORY_EXT_FLATTEN __attribute__((flatten))

// Whether the variants run: on x86-64-v4 CPUs unless MEMORY_EXT_NO_AVX512_VARIANTS is set
// (read once; the tests use it to compare the variants with the clones bit for bit).
inline bool use_avx512_variants() {
  static const bool v4 = __builtin_cpu_supports("x86-64-v4") &&
                         std::getenv("MEMORY_EXT_NO_AVX512_VARIANTS") == nullptr;
  return v4;
}

// 16 fp16 codes widened by one vcvtph2ps: exact for every code, subnormals included, and
// unaffected by a denormals-are-zero mode. (GCC converts a _Float16 vector one lane at a
// time, and the portable decode, half_to_float, costs about 13 vector operations per 16.)
MEMORY_EXT_V4 inline void load_half_lanes(lanes_vector_t<float>& v, const half_bits* codes) {
  static_assert(kDotLanes == 16, "one vcvtph2ps widens 16 codes");
  // (maskz, all lanes: the unmasked form trips GCC 12's -Wuninitialized in its header)
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  const __m512 wide = _mm512_maskz_cvtph_ps(0xffff, raw);
  std::memcpy(&v, &wide, sizeof(v));
}

// Rows of byte codes (uint8, e4m3) and fp16 rows, kDotLanes codes widened at a time. Over a
// whole chunk GCC widens bytes through 16-bit halves and extracts (about nine shuffles per
// 64 codes, on the one port that shuffles); 16 uint8 codes to 16 floats is one
// zero-extending load (vpmovzxbd) and one conversion; fp16 codes take load_half_lanes.
// Under AVX2 these 64-byte vectors would be assembled lane by lane, hence AVX-512 only.
template <int C, typename R>
struct CodeLaneSums {
  static_assert(C % kDotLanes == 0, "CodeLaneSums: whole vectors of lanes");
  static constexpr int kVectors = C / kDotLanes;
  lanes_vector_t<float> s[kVectors];
  static MEMORY_EXT_V4 inline void load(lanes_vector_t<float>& v, const R* __restrict codes) {
    if constexpr (std::is_same_v<R, half_bits>) {
      load_half_lanes(v, codes);
    } else {
      float f[kDotLanes];
#pragma GCC unroll 16
      for (int l = 0; l < kDotLanes; ++l) {
        if constexpr (std::is_same_v<R, uint8_t>)
          f[l] = float(int32_t(codes[l]));  // through int32: GCC converts uint8 lane by lane
        else
          f[l] = widen(codes[l]);
      }
      std::memcpy(&v, f, sizeof(v));
    }
  }
  MEMORY_EXT_V4 inline void start(float w, const R* __restrict row) {
#pragma GCC unroll 64
    for (int b = 0; b < kVectors; ++b) {
      lanes_vector_t<float> v;
      load(v, row + b * kDotLanes);
      s[b] = w * v;
    }
  }
  MEMORY_EXT_V4 inline void add(float w, const R* __restrict row) {
#pragma GCC unroll 64
    for (int b = 0; b < kVectors; ++b) {
      lanes_vector_t<float> v;
      load(v, row + b * kDotLanes);
      s[b] += w * v;
    }
  }
  MEMORY_EXT_V4 inline void store(float* __restrict out) const {
#pragma GCC unroll 64
    for (int b = 0; b < kVectors; ++b) std::memcpy(out + b * kDotLanes, &s[b], sizeof(s[b]));
  }
};

// The same sums for bf16 rows (raw bits) as vectors of kDotLanes floats: a 64-byte load
// holds 2 * kDotLanes codes, the odd ones the top halves of its 32-bit lanes (a mask makes
// them floats) and the even ones the low halves (a shift). The even and odd elements are
// summed in vectors of their own and interleaved once, at the end: two integer operations
// per 32 elements where widening 16 codes at a time takes a shuffle and a shift per 16.
template <int C>
struct Bf16PairSums {
  static_assert(C % (2 * kDotLanes) == 0, "Bf16PairSums: whole pairs of vectors");
  static constexpr int kPairs = C / (2 * kDotLanes);
  lanes_vector_t<float> even[kPairs], odd[kPairs];
  static MEMORY_EXT_V4 inline void load(lanes_vector_t<float>& e, lanes_vector_t<float>& o,
                                        const uint16_t* __restrict codes) {
    lanes_vector_t<uint32_t> bits, low, high;
    std::memcpy(&bits, codes, sizeof(bits));
    low = bits << 16;
    high = bits & 0xffff0000u;
    std::memcpy(&e, &low, sizeof(e));
    std::memcpy(&o, &high, sizeof(o));
  }
  MEMORY_EXT_V4 inline void start(float w, const uint16_t* __restrict row) {
#pragma GCC unroll 64
    for (int b = 0; b < kPairs; ++b) {
      lanes_vector_t<float> e, o;
      load(e, o, row + b * 2 * kDotLanes);
      even[b] = w * e;
      odd[b] = w * o;
    }
  }
  MEMORY_EXT_V4 inline void add(float w, const uint16_t* __restrict row) {
#pragma GCC unroll 64
    for (int b = 0; b < kPairs; ++b) {
      lanes_vector_t<float> e, o;
      load(e, o, row + b * 2 * kDotLanes);
      even[b] += w * e;
      odd[b] += w * o;
    }
  }
  MEMORY_EXT_V4 inline void store(float* __restrict out) const {
#pragma GCC unroll 64
    for (int b = 0; b < kPairs; ++b) {
      static_assert(kDotLanes == 16, "the interleave below is written for 16 lanes");
      const lanes_vector_t<float> first = __builtin_shufflevector(
          even[b], odd[b], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      const lanes_vector_t<float> second = __builtin_shufflevector(
          even[b], odd[b], 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
      std::memcpy(out + b * 2 * kDotLanes, &first, sizeof(first));
      std::memcpy(out + (b * 2 + 1) * kDotLanes, &second, sizeof(second));
    }
  }
};

template <int C>
MEMORY_EXT_V4 MEMORY_EXT_FLATTEN void bag_sum_bf16_v4(float* __restrict out,
                                                      const uint16_t* const* rows, const float* w,
                                                      const uint16_t* const* ahead,
                                                      int64_t ahead_bytes, int64_t n,
                                                      int64_t offset) {
  bag_sum_chunk<Bf16PairSums<C>, C>(out, rows, w, ahead, ahead_bytes, n, offset);
}
template <int C, typename R>
MEMORY_EXT_V4 MEMORY_EXT_FLATTEN void bag_sum_codes_v4(float* __restrict out, const R* const* rows,
                                                       const float* w, const R* const* ahead,
                                                       int64_t ahead_bytes, int64_t n,
                                                       int64_t offset) {
  bag_sum_chunk<CodeLaneSums<C, R>, C>(out, rows, w, ahead, ahead_bytes, n, offset);
}

// a * b + c, rounded once.
MEMORY_EXT_V4 inline lanes_vector_t<float> fma_lanes(const lanes_vector_t<float>& a, float b,
                                                     const lanes_vector_t<float>& c) {
  return _mm512_fmadd_ps(a, _mm512_set1_ps(b), c);
}

// row_axpy_n_clones for fp16 rows, kDotLanes elements at a time (load_half_lanes); the tail
// element by element, as there.
template <int N, bool kFirst>
MEMORY_EXT_V4 MEMORY_EXT_FLATTEN void row_axpy_n_half_v4(float* __restrict acc,
                                                         const half_bits* const* rows,
                                                         const float* w, int64_t n) {
  const half_bits* __restrict r[N];
  float wq[N];
  for (int q = 0; q < N; ++q) {
    r[q] = rows[q];
    wq[q] = w[q];
  }
  int64_t i = 0;
  for (; i + kDotLanes <= n; i += kDotLanes) {
    lanes_vector_t<float> x, sum;
    load_half_lanes(x, r[0] + i);
    if constexpr (N > 1) {
      // The clones' compiler fuses the first product into the second row's add (fma(w0, x0,
      // w1 * x1)); the same here keeps every bit of their result.
      lanes_vector_t<float> second;
      load_half_lanes(second, r[1] + i);
      sum = fma_lanes(x, wq[0], wq[1] * second);
    } else {
      sum = wq[0] * x;
    }
#pragma GCC unroll 16
    for (int q = 2; q < N; ++q) {
      load_half_lanes(x, r[q] + i);
      sum += wq[q] * x;
    }
    if constexpr (!kFirst) {
      lanes_vector_t<float> before;
      std::memcpy(&before, acc + i, sizeof(before));
      sum = before + sum;
    }
    std::memcpy(acc + i, &sum, sizeof(sum));
  }
  for (; i < n; ++i) {
    // (r[1 % N]: row 1; an index in bounds where N is 1 and that branch is not taken)
    float sum = N > 1 ? __builtin_fmaf(widen(r[0][i]), wq[0], wq[1] * widen(r[1 % N][i]))
                      : wq[0] * widen(r[0][i]);
    for (int q = 2; q < N; ++q) sum = __builtin_fmaf(wq[q], widen(r[q][i]), sum);
    acc[i] = kFirst ? sum : acc[i] + sum;
  }
}

// row_dot_clones of two fp16 rows, kDotLanes elements at a time (load_half_lanes).
MEMORY_EXT_V4 MEMORY_EXT_FLATTEN inline float row_dot_half_v4(const half_bits* __restrict a,
                                                              const half_bits* __restrict b,
                                                              int64_t n) {
  constexpr int L = kDotLanes;
  float lanes[L] = {};
  lanes_vector_t<float> s = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    lanes_vector_t<float> av, bv;
    load_half_lanes(av, a + i);
    load_half_lanes(bv, b + i);
    s += av * bv;
  }
  std::memcpy(lanes, &s, sizeof(s));
  for (int l = 0; i < n; ++i, ++l) lanes[l] += widen(a[i]) * widen(b[i]);
  return fold_lanes(lanes);
}
// Lanes for sum_rows_and_dot_n_body over fp16 rows on AVX-512 CPUs: codes widened by
// load_half_lanes, sums rounded 16 at a time by vcvtps2ph (the portable rounding is a scalar
// conversion per element; the fp16 backward spent twice bf16's time in it and the decode).
// vcvtps2ph rounds to nearest even like c10's conversion, which the clones use; only NaNs
// differ (it keeps payload bits, c10 gives 0x7e00 with the sign), so NaN lanes are set to
// c10's code and every bit matches.
struct HalfLanesV4 {
  static MEMORY_EXT_V4 inline void load(lanes_vector_t<float>& v, const half_bits* codes) {
    load_half_lanes(v, codes);
  }
  static MEMORY_EXT_V4 inline void round(c10::Half* __restrict out, const float* __restrict line) {
    static_assert(kDotLanes == 16, "one vcvtps2ph rounds 16 floats");
    for (int64_t b = 0; b < kLineElements<c10::Half>; b += kDotLanes) {
      const __m512 sums = _mm512_loadu_ps(line + b);
      // (maskz, all lanes, as in load_half_lanes)
      const __m256i codes =
          _mm512_maskz_cvtps_ph(0xffff, sums, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __mmask16 nan = _mm512_cmp_ps_mask(sums, sums, _CMP_UNORD_Q);
      const __m256i c10_nan = _mm256_or_si256(_mm256_and_si256(codes, _mm256_set1_epi16(-0x8000)),
                                              _mm256_set1_epi16(0x7e00));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + b),
                          _mm256_mask_blend_epi16(nan, codes, c10_nan));
    }
  }
};

template <int N, int M, bool kStream, bool kDots>
MEMORY_EXT_V4 MEMORY_EXT_FLATTEN void sum_rows_and_dot_n_half_v4(c10::Half* const* out,
                                                                 const half_bits* const* g,
                                                                 const float* w,
                                                                 const half_bits* const* v,
                                                                 float* dots, int64_t n) {
  sum_rows_and_dot_n_body<HalfLanesV4, N, M, kStream, kDots>(out, g, w, v, dots, n);
}

#endif  // MEMORY_EXT_GCC_X86_64

// The bag sum of one chunk (bag_sum_chunk): uint8, e4m3, fp16 and bf16 rows on AVX-512 CPUs
// take the variants above, everything else the clones of bag_sum_in_registers.
template <int C, typename R, typename A>
inline void bag_sum(A* __restrict out, const R* const* rows, const A* w, const R* const* ahead,
                    int64_t ahead_bytes, int64_t n, int64_t offset) {
#if defined(MEMORY_EXT_GCC_X86_64)
  if constexpr ((std::is_same_v<R, uint8_t> || std::is_same_v<R, e4m3_bits> ||
                 std::is_same_v<R, half_bits>) &&
                std::is_same_v<A, float> && C % kDotLanes == 0) {
    if (use_avx512_variants())
      return bag_sum_codes_v4<C>(out, rows, w, ahead, ahead_bytes, n, offset);
  }
  if constexpr (std::is_same_v<R, uint16_t> && std::is_same_v<A, float> &&
                C % (2 * kDotLanes) == 0) {
    if (use_avx512_variants())
      return bag_sum_bf16_v4<C>(out, rows, w, ahead, ahead_bytes, n, offset);
  }
#endif
  bag_sum_in_registers<C>(out, rows, w, ahead, ahead_bytes, n, offset);
}

// acc (+)= the weighted sum of N rows (row_axpy_n_clones).
template <int N, bool kFirst, typename R, typename A>
inline void row_axpy_n(A* __restrict acc, const R* const* rows, const A* w, int64_t n) {
#if defined(MEMORY_EXT_GCC_X86_64)
  if constexpr (std::is_same_v<R, half_bits> && std::is_same_v<A, float>) {
    if (use_avx512_variants()) return row_axpy_n_half_v4<N, kFirst>(acc, rows, w, n);
  }
#endif
  row_axpy_n_clones<N, kFirst>(acc, rows, w, n);
}

// sum_i a[i] * b[i] in fixed lanes (row_dot_clones).
template <typename RA, typename RB, typename A>
inline A row_dot(const RA* __restrict a, const RB* __restrict b, int64_t n) {
#if defined(MEMORY_EXT_GCC_X86_64)
  if constexpr (std::is_same_v<RA, half_bits> && std::is_same_v<RB, half_bits> &&
                std::is_same_v<A, float>) {
    if (use_avx512_variants()) return row_dot_half_v4(a, b, n);
  }
#endif
  return row_dot_clones<RA, RB, A>(a, b, n);
}

// N rows of M lookups each: their gradient rows and the lookups' dots with their value
// rows (sum_rows_and_dot_n_clones).
template <int N, int M, bool kStream, bool kDots, typename scalar_t, typename R>
inline void sum_rows_and_dot_n(scalar_t* const* out, const R* const* g, const float* w,
                               const R* const* v, float* dots, int64_t n) {
#if defined(MEMORY_EXT_GCC_X86_64)
  if constexpr (std::is_same_v<R, half_bits>) {
    if (use_avx512_variants())
      return sum_rows_and_dot_n_half_v4<N, M, kStream, kDots>(out, g, w, v, dots, n);
  }
#endif
  sum_rows_and_dot_n_clones<N, M, kStream, kDots>(out, g, w, v, dots, n);
}

}  // namespace memory_ext::cpu

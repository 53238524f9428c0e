// Vectorised row primitives for the CPU kernels. Each is compiled for AVX-512, AVX2+FMA
// and baseline x86-64 (GCC function multiversioning picks one at load time), so one
// binary is fast on new machines and still runs on old ones. Reductions keep their partial
// sums in fixed lanes and fold them in a fixed order, so a result depends only on the
// inputs, never on threads or alignment.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && !defined(__CUDACC__)
#include <emmintrin.h>
#endif

#include "memory_ext/e4m3.h"
#include "memory_ext/host_device.h"

// GCC on x86-64 (not nvcc's host pass): where the per-instruction-set variants below exist.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define MEMORY_EXT_GCC_X86_64 1
#endif

#if defined(MEMORY_EXT_GCC_X86_64)
#define MEMORY_EXT_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MEMORY_EXT_CLONES
#endif

namespace memory_ext::cpu {

// Inlined wherever called. prefetch_row must be: GCC finds that an out-of-line copy has no
// effect a program can observe and deletes the calls (seen with GCC 12 under an
// always-inlined caller: every row prefetch of the gather gone, 20 -> 34 ms).
#define MEMORY_EXT_ALWAYS_INLINE __attribute__((always_inline)) inline

// Storage types the loops see: bf16 as raw bits (widened by a shift, which vectorises),
// fp16 as raw bits (widened by half_to_float).
template <typename scalar_t>
struct raw_of {
  using type = scalar_t;
};
template <>
struct raw_of<c10::BFloat16> {
  using type = uint16_t;
};
// fp16 as raw bits too: a conversion from the compiler's _Float16 is not vectorised by GCC
// 12 (one vcvtph2ps per element even with F16C), the integer decode below is.
struct half_bits {
  uint16_t bits;
};
template <>
struct raw_of<c10::Half> {
  using type = half_bits;
};
template <typename scalar_t>
using raw_t = typename raw_of<scalar_t>::type;

// Float8 e4m3fn codes as raw bits; widen() decodes them exactly (NaN codes to NaN).
struct e4m3_bits {
  uint8_t bits;
};

using memory_ext::acc_t;  // float accumulation for every dtype but float64

// mask = all ones where c holds: c a bool (U = uint32_t) or a vector comparison (U its
// unsigned vector), so one decode serves a scalar loop and whole vectors of lanes.
template <typename U, typename C>
inline void set_lane_mask(U& mask, const C& c) {
  if constexpr (std::is_same_v<C, bool>)
    mask = 0u - uint32_t(c);
  else
    std::memcpy(&mask, &c, sizeof(mask));
}

// fp16 bits (zero-extended to 32 bits, in U: uint32_t or a vector of it) decoded exactly to
// float (F: float or the matching float vector), integer arithmetic and one subtraction
// only, so loops over fp16 rows vectorise. The exponent and mantissa move to float's
// positions and the exponent is rebased (15 -> 127); infinities and NaNs (exponent 31) get
// float's all-ones exponent; a subnormal m * 2^-24 is formed as 2^-14 * (1 + m / 1024) -
// 2^-14, an exact subtraction of normal floats, so denormals-are-zero modes cannot change
// it. The sign is set last, so -0 stays -0. (Out parameters and memcpy: a vector wider than
// the baseline's registers is not returned by value across a call.)
template <typename U, typename F>
inline void half_to_float(const U& h, F& out) {
  static_assert(sizeof(U) == sizeof(F), "half_to_float: one 32-bit lane per float");
  const U magnitude = (h & 0x7fffu) << 13;
  const U exponent = magnitude & 0x0f800000u;
  U subnormal, special;
  set_lane_mask(subnormal, exponent == 0u);
  set_lane_mask(special, exponent == 0x0f800000u);
  const U rebased = magnitude + (112u << 23) + (special & (112u << 23)) + (subnormal & (1u << 23));
  const U two_to_minus_14 = subnormal & (113u << 23);
  F value, offset;
  std::memcpy(&value, &rebased, sizeof(F));
  std::memcpy(&offset, &two_to_minus_14, sizeof(F));
  value -= offset;
  U bits;
  std::memcpy(&bits, &value, sizeof(U));
  bits |= (h & 0x8000u) << 16;
  std::memcpy(&out, &bits, sizeof(F));
}

template <typename R>
inline auto widen(R v) {
  if constexpr (std::is_same_v<R, uint16_t>) {
    uint32_t bits = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  } else if constexpr (std::is_same_v<R, half_bits>) {
    float f;
    half_to_float(uint32_t(v.bits), f);
    return f;
  } else if constexpr (std::is_same_v<R, e4m3_bits>) {
    return e4m3_to_float(v.bits);  // exact, and the CUDA kernel's decode (memory_ext/e4m3.h)
  } else if constexpr (std::is_same_v<R, double>) {
    return v;
  } else {
    return static_cast<float>(v);
  }
}

template <typename scalar_t>
inline const raw_t<scalar_t>* as_raw(const scalar_t* p) {
  return reinterpret_cast<const raw_t<scalar_t>*>(p);
}

// Where a prefetch brings a row. The gathers prefetch their rows a few lookups ahead into
// L2 (prefetcht1): an L1 prefetch holds one of the core's few line-fill buffers until its
// line arrives, so with rows of many lines the prefetches themselves stalled the loads
// (measured on an AVX-512 Xeon: bf16 rows of 1 KiB 36 -> 25 ms, uint8 rows of 520 bytes
// 23.5 -> 20.2 ms per 2^19 lookups). Other users prefetch the row they read next into L1.
enum class PrefetchTo { L1, L2 };

// Every cache line of [p, p + bytes), also when p is not line-aligned (packed quantized
// rows are not).
template <PrefetchTo To = PrefetchTo::L1>
MEMORY_EXT_ALWAYS_INLINE void prefetch_row(const void* p, int64_t bytes) {
  const auto start = reinterpret_cast<uintptr_t>(p);
  const uintptr_t end = start + static_cast<uintptr_t>(bytes);
  for (uintptr_t line = start & ~uintptr_t(63); line < end; line += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(line), 0, To == PrefetchTo::L1 ? 3 : 2);
}

// acc[i] (+)= sum_q w[q] * rows[q][i] for N rows in one pass over the accumulator. A gather
// from DRAM is bound by how many rows are in flight, not by arithmetic: N rows read side by
// side keep N rows' misses outstanding, and the accumulator is read and written once per N
// rows.
template <int N, bool kFirst, typename R, typename A>
MEMORY_EXT_CLONES void row_axpy_n_clones(A* __restrict acc, const R* const* rows, const A* w,
                                         int64_t n) {
  const R* __restrict r[N];
  A wq[N];
  for (int q = 0; q < N; ++q) {
    r[q] = rows[q];
    wq[q] = w[q];
  }
  for (int64_t i = 0; i < n; ++i) {
    A sum = wq[0] * widen(r[0][i]);
#pragma GCC unroll 16
    for (int q = 1; q < N; ++q) sum += wq[q] * widen(r[q][i]);
    acc[i] = kFirst ? sum : acc[i] + sum;
  }
}

// Dot products keep their partial sums in kDotLanes fixed lanes, folded pairwise in a fixed
// order.
constexpr int kDotLanes = 16;
template <typename A>
inline A fold_lanes(A* lanes) {  // lanes[0] = their sum, folded pairwise
  for (int w = kDotLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  return lanes[0];
}

// kDotLanes lanes of A as one value, which the compiler keeps in one register (one zmm for
// float under AVX-512, two ymm under AVX2) instead of an array it may shuffle lane by lane
// through memory.
template <typename T>
struct lanes_vector {
  typedef T type __attribute__((vector_size(kDotLanes * sizeof(T))));
};
template <typename T>
using lanes_vector_t = typename lanes_vector<T>::type;

// Whether load_lanes can load kDotLanes elements of R as one vector: float and double rows
// as they are, bf16 and fp16 bits widened by vector integer arithmetic.
template <typename R, typename A>
constexpr bool kVectorLanes = std::is_same_v<R, A> || std::is_same_v<R, uint16_t> ||
                              (std::is_same_v<R, half_bits> && std::is_same_v<A, float>);

// v = the kDotLanes elements of p widened to A, lane l from p[l] (an out parameter: a
// vector wider than the baseline's registers is not returned by value across a call).
template <typename R, typename A>
inline void load_lanes(lanes_vector_t<A>& v, const R* p) {
  if constexpr (std::is_same_v<R, A>) {
    std::memcpy(&v, p, sizeof(v));
  } else if constexpr (std::is_same_v<R, uint16_t> || std::is_same_v<R, half_bits>) {
    constexpr bool kBf16 = std::is_same_v<R, uint16_t>;
    lanes_vector_t<uint16_t> raw;
    std::memcpy(&raw, p, sizeof(raw));
    // Each 16-bit code widened to 32 bits by interleaving it with zeros, one permute (a
    // widening conversion compiled to more instructions): a bf16 code becomes the top half of
    // its float, an fp16 code the low half of what half_to_float decodes.
    lanes_vector_t<uint32_t> wide;
#if defined(__clang__) || __GNUC__ >= 12
    typedef uint16_t pairs_t __attribute__((vector_size(2 * kDotLanes * sizeof(uint16_t))));
    const lanes_vector_t<uint16_t> zero = {};
    const pairs_t pairs = kBf16
                              ? __builtin_shufflevector(zero, raw, 0, 16, 1, 17, 2, 18, 3, 19, 4,
                                                        20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25, 10,
                                                        26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31)
                              : __builtin_shufflevector(raw, zero, 0, 16, 1, 17, 2, 18, 3, 19, 4,
                                                        20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25, 10,
                                                        26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    std::memcpy(&wide, &pairs, sizeof(wide));
#else
    wide = __builtin_convertvector(raw, lanes_vector_t<uint32_t>) << (kBf16 ? 16 : 0);
#endif
    if constexpr (kBf16)
      std::memcpy(&v, &wide, sizeof(v));
    else
      half_to_float(wide, v);
  } else {
    lanes_vector_t<R> raw;
    std::memcpy(&raw, p, sizeof(raw));
    v = __builtin_convertvector(raw, lanes_vector_t<A>);
  }
}

// The running sums of a chunk of C elements of a bag, element by element: each
// instruction set's clone of bag_sum_in_registers vectorises them as it sees fit.
template <int C, typename R, typename A>
struct ElementSums {
  A s[C];
  MEMORY_EXT_ALWAYS_INLINE void start(A w, const R* __restrict row) {
    for (int l = 0; l < C; ++l) s[l] = w * widen(row[l]);
  }
  MEMORY_EXT_ALWAYS_INLINE void add(A w, const R* __restrict row) {
    for (int l = 0; l < C; ++l) s[l] += w * widen(row[l]);
  }
  MEMORY_EXT_ALWAYS_INLINE void store(A* __restrict out) const {
    for (int l = 0; l < C; ++l) out[l] = s[l];
  }
};

// out[0..C) = sum_j w[j] * rows[j][offset .. offset + C) over j < n (n >= 1), in order (the
// first product, then a multiply-add per row, fused on every CPU with FMA: all variants but
// baseline x86-64's): the C running sums stay in registers for the whole bag, and each row
// is one short burst of loads. ahead[j], when not null, is a row whose ahead_bytes bytes
// from element offset are prefetched as row j is added (the same chunk, or on to the end of
// a quantized row), a fixed number of lookups ahead, so that they are in cache when needed.
// bag_sum_chunk also prefetches the chunk of the row it adds kNearRows rows later
// into L1: the far prefetch (ahead, into L2) hides DRAM, this one the L2 -> L1 refill that
// each row's burst of loads would otherwise wait for. Measured on an AVX-512 Xeon at 2^20
// rows of 512, 4096 x 128 lookups: uint8 rows 22.0 -> 19.5 ms, bf16 26.5 -> 24.2 ms, fp32
// 47.7 -> 46.3 ms at 4 rows; 1 and 2 rows gained less, 8 the same, 16 lost.
constexpr int64_t kNearRows = 4;
template <class Sums, int C, typename R, typename A>
MEMORY_EXT_ALWAYS_INLINE void bag_sum_chunk(A* __restrict out, const R* const* rows, const A* w,
                                            const R* const* ahead, int64_t ahead_bytes, int64_t n,
                                            int64_t offset) {
  Sums sums;
  sums.start(w[0], rows[0] + offset);
  for (int64_t j = 0; j < n; ++j) {
    if (ahead[j] != nullptr) prefetch_row<PrefetchTo::L2>(ahead[j] + offset, ahead_bytes);
    if (j + kNearRows < n)
      prefetch_row<PrefetchTo::L1>(rows[j + kNearRows] + offset, C * int64_t(sizeof(R)));
    if (j > 0) sums.add(w[j], rows[j] + offset);
  }
  sums.store(out);
}

template <int C, typename R, typename A>
MEMORY_EXT_CLONES void bag_sum_in_registers(A* __restrict out, const R* const* rows, const A* w,
                                            const R* const* ahead, int64_t ahead_bytes, int64_t n,
                                            int64_t offset) {
  bag_sum_chunk<ElementSums<C, R, A>, C>(out, rows, w, ahead, ahead_bytes, n, offset);
}

// s[l] += widen(a[l]) * widen(b[l]) for every lane l, as one vector operation.
template <typename RA, typename RB, typename A>
inline void add_lane_products(lanes_vector_t<A>& s, const RA* a, const RB* b) {
  lanes_vector_t<A> av, bv;
  load_lanes<RA, A>(av, a);
  load_lanes<RB, A>(bv, b);
  s += av * bv;
}

// sum_i a[i] * b[i]: lane l adds the products of elements l, l + kDotLanes, ... in order,
// then fold_lanes.
template <typename RA, typename RB, typename A>
MEMORY_EXT_CLONES A row_dot_clones(const RA* __restrict a, const RB* __restrict b, int64_t n) {
  constexpr int L = kDotLanes;
  A lanes[L] = {};
  int64_t i = 0;
  if constexpr (kVectorLanes<RA, A> && kVectorLanes<RB, A>) {
    lanes_vector_t<A> s = {};
    for (; i + L <= n; i += L) add_lane_products<RA, RB, A>(s, a + i, b + i);
    std::memcpy(lanes, &s, sizeof(s));
  } else {
    for (; i + L <= n; i += L)
      for (int l = 0; l < L; ++l) lanes[l] += A(widen(a[i + l])) * A(widen(b[i + l]));
  }
  for (int l = 0; i < n; ++i, ++l) lanes[l] += A(widen(a[i])) * A(widen(b[i]));
  return fold_lanes(lanes);
}

// out[i] = round(acc[i]) in the output dtype. Compiled per instruction set like the loops
// above: bf16's round-to-nearest-even is integer arithmetic that baseline x86-64 does four
// lanes at a time, AVX-512 sixteen.
template <typename scalar_t, typename A>
inline void round_into(scalar_t* __restrict out, const A* __restrict acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(acc[i]);
}
template <typename scalar_t, typename A>
MEMORY_EXT_CLONES void row_store(scalar_t* __restrict out, const A* __restrict acc, int64_t n) {
  round_into(out, acc, n);
}

// row_store with non-temporal (streaming) 16-byte stores, for large outputs written once
// and not read again soon: the line is not read from DRAM before it is overwritten (which
// a plain store does) and does not evict the rows being read (sparse backward at 2^20 x
// 512 fp32: 132 -> 122 ms on a 2-core Xeon). A 16-bit output is rounded kStreamChunk
// elements at a time into a local block that the stores then copy. The caller fences with
// stream_fence() before another thread reads out. Only where out is 16-byte aligned and
// the CPU is x86-64; otherwise plain row_store.
template <typename scalar_t>
constexpr int64_t kLineElements = 64 / sizeof(scalar_t);

#if defined(__x86_64__) && !defined(__CUDACC__)
// out[0 .. kLineElements) = line, by 16-byte streaming stores; out 16-byte aligned.
template <typename scalar_t>
MEMORY_EXT_ALWAYS_INLINE void stream_line(scalar_t* __restrict out,
                                          const scalar_t* __restrict line) {
  for (int64_t l = 0; l < kLineElements<scalar_t>; l += 16 / int64_t(sizeof(scalar_t))) {
    __m128i bits;
    std::memcpy(&bits, line + l, 16);
    _mm_stream_si128(reinterpret_cast<__m128i*>(out + l), bits);
  }
}
#endif

template <typename scalar_t, typename A>
MEMORY_EXT_CLONES void row_store_streaming(scalar_t* __restrict out, const A* __restrict acc,
                                           int64_t n) {
#if defined(__x86_64__) && !defined(__CUDACC__)
  constexpr int64_t kStreamChunk = kLineElements<scalar_t>;  // 64 bytes a block
  if (reinterpret_cast<uintptr_t>(out) % 16 == 0) {
    int64_t i = 0;
    for (; i + kStreamChunk <= n; i += kStreamChunk) {
      alignas(64) scalar_t block[kStreamChunk];
      const scalar_t* from = block;
      if constexpr (std::is_same_v<scalar_t, A>)
        from = acc + i;
      else
        round_into(block, acc + i, kStreamChunk);
      stream_line(out + i, from);
    }
    round_into(out + i, acc + i, n - i);
    return;
  }
#endif
  row_store(out, acc, n);
}

// For N rows that each have M lookups (M = 1 is most of them where the rows outnumber the
// lookups): out[q] = round(w[q][0] * g[q][0] + ... + w[q][M-1] * g[q][M-1]), summed in that
// order, and with kDots dots[q][k] = <v[q], g[q][k]> in row_dot_clones's lanes and order,
// so every bit equals what row_axpy_n<1, true>, then row_axpy_n<1, false> per further
// lookup, row_store(_streaming) and row_dot give one row at a time. (g, w and dots hold
// row q's lookups at q * M .. q * M + M - 1.) The N rows go side by side, a 64-byte line
// of output at a time, so that N value rows' and N * M gradient rows' misses are in flight
// together and the dot products are independent chains (one row at a time, each row waited
// for its misses and each dot for its own adds). With kStream, out is written with
// streaming stores (row_store_streaming; the caller fences). n: a multiple of
// kLineElements<scalar_t>; out: 16-byte aligned.
//
// Lanes says how rows are widened to float lanes (Lanes::load) and how a line of sums is
// rounded to the output dtype (Lanes::round): PortableLanes in the clones below, an AVX-512
// variant for fp16 rows in row_dispatch.h.
struct PortableLanes {
  template <typename R>
  static inline void load(lanes_vector_t<float>& v, const R* p) {
    load_lanes<R, float>(v, p);
  }
  template <typename scalar_t>
  static inline void round(scalar_t* __restrict out, const float* __restrict line) {
    round_into(out, line, kLineElements<scalar_t>);
  }
};

template <class Lanes, int N, int M, bool kStream, bool kDots, typename scalar_t, typename R>
MEMORY_EXT_ALWAYS_INLINE void sum_rows_and_dot_n_body(scalar_t* const* out, const R* const* g,
                                                      const float* w, const R* const* v,
                                                      float* dots, int64_t n) {
  constexpr int64_t kLine = kLineElements<scalar_t>;
  static_assert(kLine % kDotLanes == 0, "whole vectors of lanes per line");
  lanes_vector_t<float> s[N * M] = {};
  for (int64_t i = 0; i < n; i += kLine) {
#pragma GCC unroll 16
    for (int q = 0; q < N; ++q) {
      alignas(64) float summed[kLine];
#pragma GCC unroll 4
      for (int64_t b = 0; b < kLine; b += kDotLanes) {
        lanes_vector_t<float> vv, x;
        if constexpr (kDots) Lanes::load(vv, v[q] + i + b);
#pragma GCC unroll 4
        for (int k = 0; k < M; ++k) {
          lanes_vector_t<float> gv;
          Lanes::load(gv, g[q * M + k] + i + b);
          if constexpr (kDots) s[q * M + k] += vv * gv;
          if (k == 0) {
            x = w[q * M] * gv;
            // One lookup at a time, this product is stored before the next is added: without
            // the barrier the compiler may fuse it, not the next one, into the add.
            if constexpr (M > 1) asm("" : "+m"(x));
          } else {
            x = x + w[q * M + k] * gv;
          }
        }
        std::memcpy(summed + b, &x, sizeof(x));
      }
#if defined(__x86_64__) && !defined(__CUDACC__)
      if constexpr (kStream) {
        alignas(64) scalar_t block[kLine];
        const scalar_t* from = block;
        if constexpr (std::is_same_v<scalar_t, float>)
          from = summed;
        else
          Lanes::round(block, summed);
        stream_line(out[q] + i, from);
        continue;
      }
#endif
      Lanes::round(out[q] + i, summed);
    }
  }
  if constexpr (kDots) {
    for (int j = 0; j < N * M; ++j) {
      float lanes[kDotLanes];
      std::memcpy(lanes, &s[j], sizeof(lanes));
      dots[j] = fold_lanes(lanes);
    }
  }
}

template <int N, int M, bool kStream, bool kDots, typename scalar_t, typename R>
MEMORY_EXT_CLONES void sum_rows_and_dot_n_clones(scalar_t* const* out, const R* const* g,
                                                 const float* w, const R* const* v, float* dots,
                                                 int64_t n) {
  sum_rows_and_dot_n_body<PortableLanes, N, M, kStream, kDots>(out, g, w, v, dots, n);
}

// Orders this thread's streaming stores before whatever it does next (a task's end).
inline void stream_fence() {
#if defined(__x86_64__) && !defined(__CUDACC__)
  _mm_sfence();
#endif
}

}  // namespace memory_ext::cpu

// Vectorised row primitives for the CPU kernels. Each is compiled for AVX-512, AVX2+FMA
// and baseline x86-64 (GCC function multiversioning picks one at load time), so one
// binary is fast on new machines and still runs on old ones. Reductions keep 16 partial
// sums in fixed lanes and fold them in a fixed order, so a result depends only on the
// inputs, never on threads or alignment.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "memory_ext/host_device.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define MEMORY_EXT_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MEMORY_EXT_CLONES
#endif

namespace memory_ext::cpu {

// Storage types the loops see: bf16 as raw bits (widened by a shift, which vectorises),
// fp16 as the compiler's _Float16 (vcvtph2ps with F16C).
template <typename scalar_t>
struct raw_of {
  using type = scalar_t;
};
template <>
struct raw_of<c10::BFloat16> {
  using type = uint16_t;
};
#if defined(__FLT16_MAX__)
template <>
struct raw_of<c10::Half> {
  using type = _Float16;
};
#else
template <>
struct raw_of<c10::Half> {
  using type = c10::Half;
};
#endif
template <typename scalar_t>
using raw_t = typename raw_of<scalar_t>::type;

using memory_ext::acc_t;  // float accumulation for every dtype but float64

template <typename R>
inline auto widen(R v) {
  if constexpr (std::is_same_v<R, uint16_t>) {
    uint32_t bits = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
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

// acc[i] += w * row[i]
template <typename R, typename A>
MEMORY_EXT_CLONES void row_axpy(A* __restrict acc, const R* __restrict row, A w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * widen(row[i]);
}

// acc[i] = w * row[i] (first row of a bag: saves zeroing the accumulator)
template <typename R, typename A>
MEMORY_EXT_CLONES void row_scale(A* __restrict acc, const R* __restrict row, A w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] = w * widen(row[i]);
}

// acc[i] (+)= w0 * r0[i] + w1 * r1[i] + w2 * r2[i] + w3 * r3[i]: four rows in flight per
// pass over the accumulator, which keeps more memory requests outstanding than one row at
// a time (about 1.5x faster gathers from DRAM) and touches the accumulator a quarter as often.
template <bool kFirst, typename R, typename A>
MEMORY_EXT_CLONES void row_axpy4(A* __restrict acc, const R* __restrict r0, const R* __restrict r1,
                                 const R* __restrict r2, const R* __restrict r3, const A* w,
                                 int64_t n) {
  const A w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  for (int64_t i = 0; i < n; ++i) {
    const A sum = w0 * widen(r0[i]) + w1 * widen(r1[i]) + w2 * widen(r2[i]) + w3 * widen(r3[i]);
    acc[i] = kFirst ? sum : acc[i] + sum;
  }
}

// out[q] = sum_i a[i] * b_q[i] for four rows b_q sharing one a: 16 fixed lanes each.
template <typename R, typename A>
MEMORY_EXT_CLONES void row_dot4(const R* __restrict a, const R* __restrict b0,
                                const R* __restrict b1, const R* __restrict b2,
                                const R* __restrict b3, int64_t n, A* out) {
  constexpr int L = 16;
  A l0[L] = {}, l1[L] = {}, l2[L] = {}, l3[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int l = 0; l < L; ++l) {
      const A x = widen(a[i + l]);
      l0[l] += x * widen(b0[i + l]);
      l1[l] += x * widen(b1[i + l]);
      l2[l] += x * widen(b2[i + l]);
      l3[l] += x * widen(b3[i + l]);
    }
  for (int l = 0; i < n; ++i, ++l) {
    const A x = widen(a[i]);
    l0[l] += x * widen(b0[i]);
    l1[l] += x * widen(b1[i]);
    l2[l] += x * widen(b2[i]);
    l3[l] += x * widen(b3[i]);
  }
  for (int w = L / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) {
      l0[l] += l0[l + w];
      l1[l] += l1[l + w];
      l2[l] += l2[l + w];
      l3[l] += l3[l + w];
    }
  out[0] = l0[0];
  out[1] = l1[0];
  out[2] = l2[0];
  out[3] = l3[0];
}

// sum_i a[i] * b[i] with 16 fixed lanes, folded pairwise in a fixed order.
template <typename RA, typename RB, typename A>
MEMORY_EXT_CLONES A row_dot(const RA* __restrict a, const RB* __restrict b, int64_t n) {
  constexpr int L = 16;
  A lanes[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int l = 0; l < L; ++l) lanes[l] += A(widen(a[i + l])) * A(widen(b[i + l]));
  for (int l = 0; i < n; ++i, ++l) lanes[l] += A(widen(a[i])) * A(widen(b[i]));
  for (int w = L / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  return lanes[0];
}

// out[i] = round(acc[i]) in the output dtype.
template <typename scalar_t, typename A>
inline void row_store(scalar_t* __restrict out, const A* __restrict acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(acc[i]);
}

// Into L1 (prefetcht0): measured faster than L2-only hints for rows of 1-4 KiB.
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

}  // namespace memory_ext::cpu

// Device helpers shared by every CUDA kernel: the value types they see, float
// accumulation, 16-byte vector loads and stores, lanes and sub-warps, and dynamic shared
// memory. Kernels are written in plain CUDA plus these helpers (and memory_ext/cuda_sm80.cuh
// for tensor cores), free of torch headers, so tests/cuda_emulate.h can compile the same
// source as host C++: it defines MEMORY_EXT_EMULATE and supplies the CUDA built-ins.
#pragma once

#ifndef MEMORY_EXT_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "memory_ext/host_device.h"

// Every vector access of these helpers states its alignment here. The GPU faults on a
// misaligned global access and silently reads the wrong words of shared memory; the
// emulation defines this to check the address, so a launcher that picks too wide a vector
// fails there too. On the GPU it is nothing.
#ifndef MEMORY_EXT_CHECK_ALIGNED
#define MEMORY_EXT_CHECK_ALIGNED(ptr, bytes, what) ((void)0)
#endif

// The dynamic shared memory of a launch, 16-byte aligned, as `char name[]`. (The
// emulation defines its own.)
#ifndef MEMORY_EXT_DYNAMIC_SMEM
#define MEMORY_EXT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) char name[]
#endif

namespace memory_ext::cuda {

MEMORY_EXT_DEVICE float to_acc(float v) { return v; }
MEMORY_EXT_DEVICE double to_acc(double v) { return v; }
MEMORY_EXT_DEVICE float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
MEMORY_EXT_DEVICE float to_acc(__half v) { return __half2float(v); }

template <typename T>
MEMORY_EXT_DEVICE T from_acc(acc_t<T> v);
template <>
MEMORY_EXT_DEVICE float from_acc<float>(float v) {
  return v;
}
template <>
MEMORY_EXT_DEVICE double from_acc<double>(double v) {
  return v;
}
template <>
MEMORY_EXT_DEVICE __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
MEMORY_EXT_DEVICE __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}

// ---------------------------------------------------------------------------------------
// Vectors: N elements moved as one aligned access. The vector paths require the row
// length and the base pointers to be multiples of the vector size; launchers pick N with
// widest_vector (memory_ext/launch_rules.h), which steps down to narrower vectors.

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Elements per 16-byte access.
template <typename T>
constexpr int kVec16 = static_cast<int>(16 / sizeof(T));

template <int Bytes>
struct RawWord;
template <>
struct RawWord<2> {
  using type = unsigned short;
};
template <>
struct RawWord<4> {
  using type = unsigned int;
};
template <>
struct RawWord<8> {
  using type = unsigned long long;
};
template <>
struct RawWord<16> {
  using type = uint4;
};

// Read-only (non-coherent) load of an aligned vector: the data is never written while a
// kernel runs, so the texture path is safe and keeps the L1 for reuse.
template <typename T, int N>
MEMORY_EXT_DEVICE Vec<T, N> load_nc(const T* p) {
  constexpr int kBytes = sizeof(T) * N;
  static_assert(kBytes <= 16, "one load moves at most 16 bytes");
  using W = typename RawWord<kBytes>::type;
  MEMORY_EXT_CHECK_ALIGNED(p, kBytes, "load_nc");
  const W w = __ldg(reinterpret_cast<const W*>(p));
  Vec<T, N> out;
  memcpy(&out, &w, kBytes);
  return out;
}

// Plain (coherent) load of an aligned vector, for data the kernel also writes (the
// non-coherent path of load_nc may serve stale lines for those).
template <typename T, int N>
MEMORY_EXT_DEVICE Vec<T, N> load_vec(const T* p) {
  MEMORY_EXT_CHECK_ALIGNED(p, sizeof(Vec<T, N>) < 16 ? sizeof(Vec<T, N>) : 16, "load_vec");
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
MEMORY_EXT_DEVICE void store_vec(T* p, const Vec<T, N>& v) {
  // A vector wider than 16 bytes (float32 partial sums of 8 bf16 columns) is stored as
  // 16-byte pieces, so 16 bytes is all the hardware needs.
  MEMORY_EXT_CHECK_ALIGNED(p, sizeof(v) < 16 ? sizeof(v) : 16, "store_vec");
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

template <typename T, int N>
MEMORY_EXT_DEVICE Vec<T, N> zero_vec() {
  Vec<T, N> out;
  memset(&out, 0, sizeof(out));
  return out;
}

// Widens element pairs of a bf16 vector word (low element first).
MEMORY_EXT_DEVICE float bf16_lo(uint32_t word) { return __uint_as_float(word << 16); }
MEMORY_EXT_DEVICE float bf16_hi(uint32_t word) { return __uint_as_float(word & 0xffff0000u); }

// acc[e] += w * v[e]. bf16 widens by a shift of each 32-bit word (two elements), which
// keeps the loaded words packed until used and so saves registers.
template <typename T, int N>
MEMORY_EXT_DEVICE void fma_vec(acc_t<T> (&acc)[N], acc_t<T> w, const Vec<T, N>& v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16> && N % 2 == 0) {
    uint32_t words[N / 2];
    memcpy(words, &v, sizeof(words));
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      acc[2 * i] = fmaf(w, bf16_lo(words[i]), acc[2 * i]);
      acc[2 * i + 1] = fmaf(w, bf16_hi(words[i]), acc[2 * i + 1]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] += w * to_acc(v.v[e]);
  }
}

// acc[e] += w * g[e] and dot += g[e] * v[e] in one sweep, so each widened element of g
// dies right after its two uses (fewer live registers than two separate sweeps).
template <typename T, int N>
MEMORY_EXT_DEVICE void fma_dot_vec(acc_t<T> (&acc)[N], acc_t<T> w, const Vec<T, N>& g,
                                   const Vec<T, N>& v, acc_t<T>& dot) {
  if constexpr (std::is_same_v<T, __nv_bfloat16> && N % 2 == 0) {
    uint32_t wg[N / 2], wv[N / 2];
    memcpy(wg, &g, sizeof(wg));
    memcpy(wv, &v, sizeof(wv));
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const float g0 = bf16_lo(wg[i]), g1 = bf16_hi(wg[i]);
      acc[2 * i] = fmaf(w, g0, acc[2 * i]);
      acc[2 * i + 1] = fmaf(w, g1, acc[2 * i + 1]);
      dot = fmaf(g0, bf16_lo(wv[i]), dot);
      dot = fmaf(g1, bf16_hi(wv[i]), dot);
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const acc_t<T> ge = to_acc(g.v[e]);
      acc[e] += w * ge;
      dot += ge * to_acc(v.v[e]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Arrays whose element type is chosen at run time (one kernel serves both, the branch is
// uniform): int32 or int64 indices, float32 or T weights.

MEMORY_EXT_DEVICE int64_t load_index(const void* p, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i]
              : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

template <typename T>
MEMORY_EXT_DEVICE acc_t<T> load_f32_or(const void* p, bool is_f32, int64_t i) {
  return is_f32 ? static_cast<acc_t<T>>(static_cast<const float*>(p)[i])
                : to_acc(static_cast<const T*>(p)[i]);
}

template <typename T>
MEMORY_EXT_DEVICE void store_f32_or(void* p, bool is_f32, int64_t i, acc_t<T> v) {
  if (is_f32)
    static_cast<float*>(p)[i] = static_cast<float>(v);
  else
    static_cast<T*>(p)[i] = from_acc<T>(v);
}

// ---------------------------------------------------------------------------------------
// Lanes of a warp, and shared-memory accesses wider than their pointer type (shared
// memory is reinterpreted freely; the offsets are chosen aligned).

MEMORY_EXT_DEVICE int lane_id() { return static_cast<int>(threadIdx.x) & (kWarpSize - 1); }
MEMORY_EXT_DEVICE uint32_t lanemask_lt() { return (1u << lane_id()) - 1u; }

MEMORY_EXT_DEVICE uint32_t lds_u32(const uint16_t* p) {
  MEMORY_EXT_CHECK_ALIGNED(p, 4, "lds_u32");
  return *reinterpret_cast<const uint32_t*>(p);
}
MEMORY_EXT_DEVICE void sts_f2(float* p, float a, float b) {
  MEMORY_EXT_CHECK_ALIGNED(p, 8, "sts_f2");
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
MEMORY_EXT_DEVICE float half_bits_to_float(uint16_t h) { return __half2float(__ushort_as_half(h)); }

// ---------------------------------------------------------------------------------------
// Groups of G consecutive lanes (G a power of two <= 32) that work on one item. Shuffles
// name only the group's own lanes, so groups of one warp may diverge freely.

template <int G>
MEMORY_EXT_DEVICE unsigned group_mask() {
  static_assert(G >= 1 && G <= kWarpSize && (G & (G - 1)) == 0, "G must be a power of two <= 32");
  if constexpr (G == kWarpSize) {
    return 0xffffffffu;
  } else {
    const unsigned group = (threadIdx.x % kWarpSize) / G;
    return ((1u << G) - 1u) << (group * G);
  }
}

// Sum over the G lanes of a group; every lane gets the result. The butterfly order is
// fixed, so the result depends only on the inputs.
template <int G, typename A>
MEMORY_EXT_DEVICE A group_sum(unsigned mask, A v) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(mask, v, offset, G);
  return v;
}

}  // namespace memory_ext::cuda

// What host and device code share: the function qualifiers, the warp size, the
// accumulation type and bit casts. Free of torch and CUDA headers, so it compiles in the
// three ways kernel code is built:
//   nvcc                  the CUDA kernels (__CUDACC__ defined);
//   host C++              the CPU kernels and launchers, which share small functions with
//                         the device (row_adam_math.h, the pk_topk layout arithmetic);
//   host C++ emulation    the CUDA kernels themselves run on the CPU by
//                         tests/cuda_emulate.h, which defines MEMORY_EXT_EMULATE and
//                         supplies the CUDA built-ins the kernels use.
// Every CUDA kernel header includes this (through memory_ext/cuda_device.cuh) and writes
// device functions as MEMORY_EXT_DEVICE, functions for both sides as MEMORY_EXT_HD.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define MEMORY_EXT_HD __host__ __device__ __forceinline__
#else
#define MEMORY_EXT_HD inline
#endif
// Device-only functions; under the emulation __device__ and __forceinline__ are the
// harness's (nothing and inline).
#define MEMORY_EXT_DEVICE __device__ __forceinline__

namespace memory_ext {

// The accumulation rule of every kernel, CPU and CUDA: float64 accumulates in float64,
// every other floating dtype (float32, bfloat16, float16) in float32. acc_dtype in
// memory_ext/checks.h is the same rule for ATen dtypes.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The bits of `from` as a To of the same size (memcpy: defined behaviour on both sides,
// and a plain register move after optimisation).
template <typename To, typename From>
MEMORY_EXT_HD To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs types of one size");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// a * b rounded on its own, never fused with the addition that consumes it. Compilers fuse
// a * b + c into one fused multiply-add (one rounding instead of two) where they may: nvcc
// by default, GCC in the CPU kernels' x86-64-v3/v4 clones (-ffp-contract=fast is its
// default for C++). Fusing in some places and not in others would make CUDA and CPU, or
// two CPUs, differ in the last bit, so every product that meets an addition in the
// formulas CPU and CUDA share (row_adam_math.h, row_adagrad_math.h) goes through this:
// __fmul_rn / __dmul_rn on the device are never fused. On the host GCC fuses even across
// __builtin_assoc_barrier, so the CPU functions that evaluate those formulas carry
// MEMORY_EXT_NO_FP_CONTRACT instead, which turns fusing off for the whole function
// (Clang fuses only within one expression by default, which a call already ends).
// Division and sqrt are IEEE-rounded on both sides: the build uses neither
// --use_fast_math nor -prec-div=false.
template <typename S>
MEMORY_EXT_HD S mul_rn(S a, S b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<S, float>)
    return __fmul_rn(a, b);
  else
    return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define MEMORY_EXT_NO_FP_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define MEMORY_EXT_NO_FP_CONTRACT
#endif

namespace cuda {

using memory_ext::acc_t;
using memory_ext::bit_cast;
using memory_ext::ceil_div;

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

}  // namespace cuda
}  // namespace memory_ext

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

namespace cuda {

using memory_ext::acc_t;
using memory_ext::bit_cast;
using memory_ext::ceil_div;

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

}  // namespace cuda
}  // namespace memory_ext

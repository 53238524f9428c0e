// Host helpers of the CUDA kernels: launch arithmetic and the dispatch from an ATen dtype
// to the device value type. Include it from .cu files only; the device helpers live in
// cuda_device.cuh.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "memory_ext/cuda_device.cuh"
#include "memory_ext/launch_rules.h"

namespace memory_ext::cuda {

// Grid of at most `cap` blocks for `items` work units of `per_block` units each; kernels
// that use it loop over the rest (grid-stride), so no item is lost when the cap bites.
inline unsigned int grid_for(int64_t items, int64_t per_block, int64_t cap = int64_t(1) << 20) {
  const int64_t blocks = ceil_div(items, per_block);
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// ATen's bf16/fp16 are bit-compatible with CUDA's; the kernels use CUDA's so that
// conversions are the hardware instructions (round to nearest even, like c10's).
template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the device type of a floating ATen dtype.
template <typename F>
decltype(auto) dispatch_value_type(c10::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case c10::ScalarType::Float:
      return f(TypeTag<float>{});
    case c10::ScalarType::Double:
      return f(TypeTag<double>{});
    case c10::ScalarType::BFloat16:
      return f(TypeTag<__nv_bfloat16>{});
    case c10::ScalarType::Half:
      return f(TypeTag<__half>{});
    default:
      TORCH_CHECK(false, "memory.", op, ": unsupported dtype ", st);
  }
}

}  // namespace memory_ext::cuda

// Float8 e4m3fn codes (1 sign, 4 exponent, 3 mantissa bits, bias 7, no infinity, NaN at
// 0x7f / 0xff) decoded exactly to float32: one home for the CPU kernels (row_math.h) and the
// CUDA kernel of quantized_embedding_bag, so both read the same values.
#pragma once

#include <cstdint>

#include "memory_ext/host_device.h"

namespace memory_ext {

// The exponent and mantissa move to float32's positions and the exponent is rebased (7 ->
// 127); a subnormal m * 2^-9 (exponent 0) is formed as 2^-6 * (1 + m / 8) - 2^-6, an exact
// subtraction of normal floats, so no float32 subnormal is formed and denormals-are-zero
// modes cannot change the result. The NaN code 0x7f gets a NaN's bits; the sign bit is set
// last, so -0 stays -0. Masks, not selects or branches: integer arithmetic that a CPU loop
// vectorises at about a dozen operations per 16 codes.
MEMORY_EXT_HD float e4m3_to_float(uint8_t code) {
  const uint32_t bits = code, magnitude = bits & 0x7fu;
  const uint32_t subnormal = 0u - uint32_t(magnitude < 8u), nan = 0u - uint32_t(magnitude == 0x7fu);
  const uint32_t rebased = (magnitude << 20) + (120u << 23) + (subnormal & (1u << 23));
  const float value = bit_cast<float>(rebased) - bit_cast<float>(subnormal & (121u << 23));
  return bit_cast<float>(bit_cast<uint32_t>(value) | (nan & 0x7fc00000u) | ((bits & 0x80u) << 24));
}

}  // namespace memory_ext

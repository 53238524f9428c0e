// Float8 e4m3fn codes (1 sign, 4 exponent, 3 mantissa bits, bias 7, no infinity, NaN at
// 0x7f / 0xff) decoded exactly to float32: one home for the CPU kernels (row_math.h) and the
// CUDA kernel of quantized_embedding_bag, so both read the same values.
#pragma once

#include <cstdint>

#include "memory_ext/host_device.h"

namespace memory_ext {

// Every e4m3 magnitude is an integer times 2^-9 below 2^18: (8 + mantissa) << (exponent -
// 1), or the mantissa alone for exponent 0, converted exactly to float. Arithmetic only (a
// select or a branch keeps a CPU loop scalar); the NaN code 0x7f adds a NaN (x + 0 = x
// otherwise), and the sign bit is set last, so -0 stays -0. No float32 subnormal is formed,
// so denormals-are-zero modes cannot change the result.
MEMORY_EXT_HD float e4m3_to_float(uint8_t code) {
  const uint32_t magnitude = code & 0x7fu;
  const uint32_t exponent = magnitude >> 3, normal = uint32_t(exponent != 0);
  const uint32_t scaled = ((magnitude & 7u) + 8u * normal) << (exponent - normal);
  const float nan_or_zero = bit_cast<float>((0u - uint32_t(magnitude == 0x7fu)) & 0x7fc00000u);
  const float f = static_cast<float>(static_cast<int32_t>(scaled)) * 0x1p-9f + nan_or_zero;
  return bit_cast<float>(bit_cast<uint32_t>(f) | (uint32_t(code & 0x80u) << 24));
}

}  // namespace memory_ext

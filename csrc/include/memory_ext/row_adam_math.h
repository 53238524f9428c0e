// The per-element update of row_adam_, shared by the CPU and CUDA kernels so both give the
// same bits (products are rounded apart from the sums they feed: mul_rn, host_device.h):
// torch.optim.AdamW's formula (decoupled weight decay, lerp for the first moment,
// bias-corrected step), applied to one element of one touched row.
#pragma once

#include <cmath>

#include "memory_ext/host_device.h"

namespace memory_ext {

// Per-step constants, computed once per call in double and rounded to the state's
// precision: on the host from the step count row_adam_ is given, or, for
// row_adam_capturable_ on CUDA, by one device thread from the count in device memory (the
// device's pow may differ from the host's in the last bit of a double, so a coefficient
// can, rarely, differ in the last bit of a float).
template <typename S>
struct RowAdamCoefficients {
  S beta1, beta2, eps;
  S decay;      // 1 - lr * weight_decay
  S step_size;  // lr / (1 - beta1^step)
  S bc2_sqrt;   // sqrt(1 - beta2^step)

  MEMORY_EXT_HD static RowAdamCoefficients make(double lr, double beta1, double beta2, double eps,
                                                double weight_decay, long long step) {
#if defined(__CUDA_ARCH__)
    const double bc1 = 1.0 - pow(beta1, double(step)), bc2 = 1.0 - pow(beta2, double(step));
    const double bc2_sqrt = sqrt(bc2);
#else
    const double bc1 = 1.0 - std::pow(beta1, double(step)),
                 bc2 = 1.0 - std::pow(beta2, double(step));
    const double bc2_sqrt = std::sqrt(bc2);
#endif
    // mul_rn: nvcc would fuse lr * weight_decay into the subtraction on the device only.
    const double decay = 1.0 - mul_rn(lr, weight_decay);
    return {S(beta1), S(beta2), S(eps), S(decay), S(lr / bc1), S(bc2_sqrt)};
  }
};

// Updates the moments m, v in place and returns the new parameter value.
template <typename S>
MEMORY_EXT_HD S row_adam_element(S p, S g, S& m, S& v, const RowAdamCoefficients<S>& c) {
  m = m + mul_rn(S(1) - c.beta1, g - m);
  v = mul_rn(v, c.beta2) + mul_rn((S(1) - c.beta2) * g, g);
#if defined(__CUDA_ARCH__)
  const S denom = sqrt(v) / c.bc2_sqrt + c.eps;
#else
  const S denom = std::sqrt(v) / c.bc2_sqrt + c.eps;
#endif
  return mul_rn(p, c.decay) - c.step_size * m / denom;
}

}  // namespace memory_ext

// The per-element update of row_adam_, shared by the CPU and CUDA kernels so both give the
// same bits (products are rounded apart from the sums they feed: mul_rn, host_device.h):
// torch.optim.AdamW's formula (decoupled weight decay, lerp for the first moment,
// bias-corrected step), applied to one element of one touched row.
#pragma once

#include <cmath>

#include "memory_ext/host_device.h"

namespace memory_ext {

// Per-step constants, computed once on the host in the state's precision.
template <typename S>
struct RowAdamCoefficients {
  S beta1, beta2, eps;
  S decay;      // 1 - lr * weight_decay
  S step_size;  // lr / (1 - beta1^step)
  S bc2_sqrt;   // sqrt(1 - beta2^step)

  static RowAdamCoefficients make(double lr, double beta1, double beta2, double eps,
                                  double weight_decay, long long step) {
    const double bc1 = 1.0 - std::pow(beta1, double(step)),
                 bc2 = 1.0 - std::pow(beta2, double(step));
    return {S(beta1), S(beta2), S(eps), S(1.0 - lr * weight_decay), S(lr / bc1), S(std::sqrt(bc2))};
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

// The per-row and per-element update of row_adagrad_, shared by the CPU and CUDA kernels:
// row-wise Adagrad (FBGEMM's rowwise_adagrad), one accumulated value per row. The kernels
// differ only in how they sum a row's squares (CPU: in order; CUDA: lanes, then a fixed
// butterfly); everything after that sum is this file, so it rounds alike on both sides
// (products rounded apart from the sums they feed: mul_rn, host_device.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "memory_ext/host_device.h"

namespace memory_ext {

// Per-call constants, computed once on the host in the state's precision.
template <typename S>
struct RowAdagradCoefficients {
  S lr, eps;
  S decay;  // 1 - lr * weight_decay

  static RowAdagradCoefficients make(double lr, double eps, double weight_decay) {
    return {S(lr), S(eps), S(1.0 - lr * weight_decay)};
  }
};

// The row's new accumulated value from its old one and the sum of its squared gradient:
// sum_sq + (sum_j g_j^2) / dim, the mean square, so the step does not shrink with the row
// width. Returns the row's step size lr / (sqrt(sum_sq) + eps), one division per row
// instead of one per element.
template <typename S>
MEMORY_EXT_HD S row_adagrad_accumulate(S& sum_sq, S squares, int64_t dim,
                                       const RowAdagradCoefficients<S>& c) {
  sum_sq = sum_sq + squares / static_cast<S>(dim);
#if defined(__CUDA_ARCH__)
  return c.lr / (sqrt(sum_sq) + c.eps);
#else
  return c.lr / (std::sqrt(sum_sq) + c.eps);
#endif
}

// The new parameter value of one element, from the row's step size.
template <typename S>
MEMORY_EXT_HD S row_adagrad_element(S p, S g, S step, const RowAdagradCoefficients<S>& c) {
  return mul_rn(p, c.decay) - mul_rn(step, g);
}

}  // namespace memory_ext

// Kernel of the CUDA row_adam_: the per-element math of the CPU kernel
// (memory_ext/row_adam_math.h) over the touched rows. A row out of range is skipped (no
// write out of bounds, no host sync).
//
// Each row is owned by a group of lanes (a power of two, at most the block) that walks it
// in vectors of VEC elements: the row index is loaded once per group, and a lane's column
// comes from its lane number, not from a 64-bit division of a flat element index. Rows of
// up to kRowAdamBlock vectors take one pass; short rows share a block (several groups per
// block), so no lane idles on a 64-byte row. The vector is the widest that the row length
// and the four bases allow (widest_vector), at most 16 bytes of optimizer state.
//
// Torch-free: compiled by row_adam.cu and, as host C++, by the CPU emulation.
#pragma once

#include "memory_ext/cuda_device.cuh"
#include "memory_ext/row_adam_math.h"

namespace memory_ext::cuda {
namespace {

constexpr int kRowAdamBlock = 256;

// Elements per access: 16 bytes of the state type S (float32: 4, float64: 2).
template <typename S>
constexpr int kRowAdamMaxVec = static_cast<int>(16 / sizeof(S));

// Lanes per row, as a power of two (log2): enough for one vector each, at most the block.
inline int row_adam_lanes_log2(int64_t dim, int vec) {
  const int64_t vectors = ceil_div(dim, vec);
  int lg = 0;
  while ((int64_t(1) << lg) < vectors && (1 << lg) < kRowAdamBlock) ++lg;
  return lg;
}

// row_adam_count_kernel runs as one warp (the smallest launch the CPU emulation takes), of
// which lane 0 does the work.
constexpr int kRowAdamCountThreads = 32;

// row_adam_capturable_'s count: one thread adds one to the step count in device memory
// and writes the coefficients of the new count for row_adam_kernel to read, so that no
// value crosses to the host and the pair of launches can be captured in a CUDA graph.
template <typename S>
__global__ void row_adam_count_kernel(int64_t* __restrict__ step,
                                      RowAdamCoefficients<S>* __restrict__ coefficients, double lr,
                                      double beta1, double beta2, double eps, double weight_decay) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  const int64_t count = *step + 1;
  *step = count;
  *coefficients = RowAdamCoefficients<S>::make(lr, beta1, beta2, eps, weight_decay, count);
}

// T the parameter type, S = acc_t<T> the optimizer state's, VEC elements per access;
// (1 << lanes_log2) lanes per row. The coefficients are c, or, where coefficients_on_device
// is not null, the ones row_adam_count_kernel wrote there (row_adam_capturable_).
template <typename T, typename S, int VEC>
__global__ void __launch_bounds__(kRowAdamBlock)
    row_adam_kernel(T* __restrict__ param, S* __restrict__ exp_avg, S* __restrict__ exp_avg_sq,
                    const int64_t* __restrict__ rows, const T* __restrict__ rows_grad,
                    int64_t n_unique, int64_t dim, int64_t n_rows, int lanes_log2,
                    RowAdamCoefficients<S> given,
                    const RowAdamCoefficients<S>* __restrict__ coefficients_on_device) {
  const RowAdamCoefficients<S> c =
      coefficients_on_device != nullptr ? *coefficients_on_device : given;
  const int lanes = 1 << lanes_log2;
  const int groups = kRowAdamBlock >> lanes_log2;
  const int64_t first_col = int64_t(threadIdx.x & (lanes - 1)) * VEC;
  for (int64_t u = int64_t(blockIdx.x) * groups + (threadIdx.x >> lanes_log2); u < n_unique;
       u += int64_t(gridDim.x) * groups) {
    const int64_t r = rows[u];
    if (r < 0 || r >= n_rows) continue;
    T* p_row = param + r * dim;
    S* m_row = exp_avg + r * dim;
    S* v_row = exp_avg_sq + r * dim;
    const T* g_row = rows_grad + u * dim;
    // dim % VEC == 0 (widest_vector), so a vector is wholly in the row or past it.
    for (int64_t col = first_col; col < dim; col += int64_t(lanes) * VEC) {
      // The parameter and moments are written by this kernel, so they take plain
      // (coherent) loads; the gradient is read-only.
      Vec<T, VEC> p = load_vec<T, VEC>(p_row + col);
      Vec<S, VEC> m = load_vec<S, VEC>(m_row + col);
      Vec<S, VEC> v = load_vec<S, VEC>(v_row + col);
      const Vec<T, VEC> g = load_nc<T, VEC>(g_row + col);
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        p.v[e] = from_acc<T>(row_adam_element(static_cast<S>(to_acc(p.v[e])),
                                              static_cast<S>(to_acc(g.v[e])), m.v[e], v.v[e], c));
      store_vec(m_row + col, m);
      store_vec(v_row + col, v);
      store_vec(p_row + col, p);
    }
  }
}

}  // namespace
}  // namespace memory_ext::cuda

// Kernel of the CUDA embedding_bag forward: out[t] = sum_j w[t, j] * values[idx[t, j]].
//
// A group of G lanes (a warp, or a sub-warp when rows are short) owns one (bag, column
// tile) item. The group loads a chunk of the bag's indices and weights once, one per lane,
// and broadcasts them by shuffle; it then keeps R rows in flight (all loads issued before
// any is used) so the memory system sees enough independent requests to reach its
// bandwidth. Rows move as the widest vectors (16, 8 or 4 bytes, else single elements) that
// their length and bases allow (widest_vector, memory_ext/launch_rules.h), accumulate in
// float32 (float64 for float64), and each output element is stored once.
//
// Torch-free: compiled by embedding_bag_forward.cu and, as host C++, by the CPU emulation.
#pragma once

#include "embedding_bag_params.h"
#include "memory_ext/cuda_device.cuh"

namespace memory_ext::cuda {
namespace {

constexpr int kForwardBlock = 256;
// Rows in flight per group: 8 rows x 2 vectors x 16 bytes per lane hides DRAM latency
// with a register budget that still lets several blocks share an SM.
constexpr int kRowsInFlight = 8;

// G lanes per item, VEC elements per access, VPL accesses per lane and row: one item
// covers a tile of G * VPL * VEC columns.
template <typename T, int VEC, int G, int VPL>
__global__ void __launch_bounds__(kForwardBlock, 2) embedding_bag_kernel(const ForwardArgs a) {
  using A = acc_t<T>;
  using VecT = Vec<T, VEC>;
  constexpr int R = kRowsInFlight;
  constexpr int C = G > R ? G : R;  // bag positions per chunk of indices
  constexpr int KI = C / G;         // indices held per lane
  constexpr int kGroups = kForwardBlock / G;
  constexpr int64_t kTile = int64_t(G) * VPL * VEC;
  static_assert(C % G == 0 && C % R == 0, "chunk must split evenly into lanes and rows");

  const int lane = threadIdx.x % G;
  const unsigned mask = group_mask<G>();
  const T* V = static_cast<const T*>(a.values);
  T* O = static_cast<T*>(a.out);
  const int64_t n_tiles = ceil_div(a.dim, kTile);
  const int64_t n_items = a.tokens * n_tiles;

  // Every lane of a group runs the same iterations (the item is per group), which keeps
  // the group's shuffles converged.
  for (int64_t item = int64_t(blockIdx.x) * kGroups + threadIdx.x / G; item < n_items;
       item += int64_t(gridDim.x) * kGroups) {
    const int64_t t = item / n_tiles;
    const int64_t col0 = (item - t * n_tiles) * kTile;
    int64_t col[VPL];
    bool in[VPL];
#pragma unroll
    for (int k = 0; k < VPL; ++k) {
      col[k] = col0 + int64_t(k * G + lane) * VEC;
      in[k] = col[k] < a.dim;  // dim % VEC == 0, so a vector is wholly in or out
    }
    A acc[VPL][VEC];
#pragma unroll
    for (int k = 0; k < VPL; ++k)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[k][e] = A(0);

    const int64_t first = t * a.bag;
    for (int64_t j0 = 0; j0 < a.bag; j0 += C) {
      // Lane l holds positions j0 + l + G * i; -1 marks past-the-bag or bad indices.
      int64_t my_row[KI];
      A my_w[KI];
#pragma unroll
      for (int i = 0; i < KI; ++i) {
        const int64_t j = j0 + i * G + lane;
        my_row[i] = -1;
        my_w[i] = A(0);
        if (j < a.bag) {
          const int64_t r = load_index(a.indices, a.idx64, first + j);
          if (r >= 0 && r < a.rows) {
            my_row[i] = r;
            my_w[i] = load_f32_or<T>(a.weights, a.w_f32, first + j);
          } else if (a.first_bad != nullptr) {
            atomicMin(a.first_bad, static_cast<unsigned long long>(first + j));
          }
        }
      }
#pragma unroll
      for (int s = 0; s < C; s += R) {
        if (j0 + s >= a.bag) break;  // uniform across the group
        int64_t row[R];
        A w[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int q = s + r;
          row[r] = __shfl_sync(mask, my_row[q / G], q % G, G);
          w[r] = __shfl_sync(mask, my_w[q / G], q % G, G);
        }
        VecT v[R][VPL];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int k = 0; k < VPL; ++k)
            v[r][k] = (row[r] >= 0 && in[k]) ? load_nc<T, VEC>(V + row[r] * a.dim + col[k])
                                             : zero_vec<T, VEC>();
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int k = 0; k < VPL; ++k) fma_vec(acc[k], w[r], v[r][k]);
      }
    }
#pragma unroll
    for (int k = 0; k < VPL; ++k) {
      if (!in[k]) continue;
      VecT o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = from_acc<T>(acc[k][e]);
      store_vec(O + t * a.dim + col[k], o);
    }
  }
}

// Launch shape from the row length in accesses (n = dim / VEC): sub-warps for short rows
// so no lane idles on a 64-byte row, two accesses per lane and column tiles for long ones.
// Calls f.template operator()<G, VPL>().
template <int VEC, typename F>
void with_forward_shape(int64_t n, F&& f) {
  if constexpr (VEC > 1) {
    if (n <= 4) return f.template operator()<4, 1>();
    if (n <= 8) return f.template operator()<8, 1>();
    if (n <= 16) return f.template operator()<16, 1>();
  } else {
    if (n <= 4) return f.template operator()<4, 1>();
  }
  if (n <= 32) return f.template operator()<32, 1>();
  return f.template operator()<32, 2>();
}

}  // namespace
}  // namespace memory_ext::cuda

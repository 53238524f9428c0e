// CUDA backward of embedding_bag over the row groups of embedding_bag_sort.cu.
//
// One group of G threads per segment (a run of one row's lookups, cut at kSegment
// positions). The group holds its slice of values[row] in registers, walks the segment's
// positions in sorted (= input) order with R grad_out rows in flight, and in that one pass
//   - sums w * grad_out[t] in float32 (float64 for float64), and
//   - takes each position's weight gradient <grad_out[t], values[row]> (group-wide sum).
// Rows move as the widest vectors (16, 8 or 4 bytes, else single elements) that their
// length and every base allow (widest_vector, memory_ext/launch_rules.h).
// A run of one segment writes its row gradient directly; longer runs write float32
// partial rows that a second kernel folds in segment order. When no run is cut and runs
// are short (mostly unique rows), the short-run kernel below instead gives a group several
// runs at once, with the same summation order. No atomics, no locks, no order that
// depends on scheduling: results are bitwise reproducible. (The row gradient
// sums each column in position order whatever the launch shape; the weight gradient's
// dot product is split over lanes by the shape, which follows dim and the vector width,
// so the same data in a view of another alignment may differ in its last bits.)
//
// Torch-free: compiled by embedding_bag_backward.cu and, as host C++, by the CPU emulation.
#pragma once

#include "embedding_bag_params.h"
#include "memory_ext/cuda_device.cuh"
#include "memory_ext/launch_rules.h"

namespace memory_ext::cuda {
namespace {

// Threads per block for groups of g: a group of more than a warp is the block; smaller
// groups share blocks of 128.
constexpr int backward_block(int g) { return g > 32 ? g : 128; }

// The exact counts of the launch: the host's, or the grouping's slots on the device
// (BackwardArgs::device_counts), where the run of bad lookups, if any, is not a run.
struct BackwardCounts {
  int64_t n_runs, n_segments, n_long_runs;
};
__device__ __forceinline__ BackwardCounts backward_counts(const BackwardArgs& a) {
  const int64_t* c = a.device_counts;
  if (c == nullptr) return {a.n_runs, a.n_segments, a.n_long_runs};
  return {c[kRunsWithBad] - (c[kFirstBad] >= 0 ? 1 : 0), c[kSegments], c[kLongRuns]};
}

// Whether the short-run schedule is the one use_short_run_backward picks for these counts
// and rows of `accesses` vectors (both kernels of a both_schedules launch ask).
__device__ __forceinline__ bool short_schedule_picked(const BackwardArgs& a,
                                                      const BackwardCounts& c, int64_t accesses) {
  return use_short_run_backward(c.n_runs, c.n_segments, c.n_long_runs, a.lookups, accesses);
}

// Where a run's row gradient goes: its run's slot, or its row's of a dense gradient.
__device__ __forceinline__ int64_t row_grad_slot(const BackwardArgs& a, int64_t run, int64_t row) {
  return a.dense_rows ? row : run;
}

// G threads per segment (a power of two; above 32 the group is the whole block), VEC
// elements per access, VPT accesses per thread and row, R positions in flight. TILED
// groups loop over column tiles of G * VPT * VEC for rows wider than one tile, keeping
// the weight-gradient partial sums of the segment in shared memory between tiles.
template <typename T, int VEC, int G, int VPT, int R, bool TILED>
__global__ void __launch_bounds__(backward_block(G))
    embedding_bag_backward_kernel(const BackwardArgs a) {
  using A = acc_t<T>;
  using VecT = Vec<T, VEC>;
  constexpr int kBlock = backward_block(G);
  constexpr int W = G < kWarpSize ? G : kWarpSize;  // lanes that shuffle together
  constexpr int kWarps = G > kWarpSize ? G / kWarpSize : 1;
  constexpr int64_t kTile = int64_t(G) * VPT * VEC;
  static_assert(R <= W, "each position of a chunk is loaded by its own lane");
  static_assert(!TILED || G > kWarpSize, "tiling keeps per-segment sums in block-shared memory");
  // G > 32: each warp's share of every position's weight gradient (summed over tiles
  // when tiled), folded across warps in warp order once the segment is done. Warps never
  // wait for each other inside a segment, so their loads overlap freely.
  __shared__ A warp_dots[G > kWarpSize ? kWarps : 1][G > kWarpSize ? kSegment : 1];

  const int lane = threadIdx.x % G;
  const int wl = threadIdx.x % W;
  const unsigned mask = group_mask<W>();
  const bool need_wg = a.weights_grad != nullptr;
  const T* GO = static_cast<const T*>(a.grad_out);
  const auto bag = static_cast<uint32_t>(a.bag);  // bag <= lookups < 2^32

  // Grid-stride over segments; the segment is uniform per group and, for G > 32, the
  // group is the block, so every barrier below is reached by all of its threads. With
  // device counts the grid is sized for backward_bounds and groups past the count idle.
  const BackwardCounts counts = backward_counts(a);
  if (a.both_schedules && short_schedule_picked(a, counts, a.dim / VEC)) return;  // whole grid
  for (int64_t seg = int64_t(blockIdx.x) * (kBlock / G) + threadIdx.x / G; seg < counts.n_segments;
       seg += int64_t(gridDim.x) * (kBlock / G)) {
    // The run of this segment: the last run whose first segment is <= seg. Every run has
    // at least one segment, and all runs together have `extra` more segments than runs,
    // so plan[u].seg lies in [u, u + extra]: the run is within `extra` below seg. When
    // rows are unique or runs short (the common case) extra is 0 and the run is seg
    // itself, with no search; a few hot rows cost log2(extra) steps, not log2(n_runs).
    const int64_t extra = counts.n_segments - counts.n_runs;
    int64_t lo = seg > extra ? seg - extra : 0;
    int64_t hi = (seg < counts.n_runs - 1 ? seg : counts.n_runs - 1) + 1;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (int64_t(a.plan[mid].seg) <= seg)
        lo = mid;
      else
        hi = mid;
    }
    const int64_t u = lo;
    const int64_t run_b = a.run_begin[u], run_e = a.run_begin[u + 1];
    const int64_t n_seg = ceil_div(run_e - run_b, kSegment);
    const int64_t k = seg - a.plan[u].seg;
    const int64_t pb = run_b + k * kSegment;
    const int64_t pe = pb + kSegment < run_e ? pb + kSegment : run_e;
    const int64_t row = a.keys[run_b];
    if (k == 0 && threadIdx.x % G == 0) {
      if (a.rows_out != nullptr) a.rows_out[u] = row;
      if (n_seg > 1) a.long_runs[a.plan[u].long_rank] = static_cast<uint32_t>(u);
    }
    const T* V = static_cast<const T*>(a.values) + row * a.dim;
    T* out_row = static_cast<T*>(a.rows_grad) + row_grad_slot(a, u, row) * a.dim;
    A* part_row = n_seg > 1
                      ? static_cast<A*>(a.partial) + (int64_t(a.plan[u].long_slot) + k) * a.dim
                      : nullptr;

    const int64_t n_tiles = TILED ? ceil_div(a.dim, kTile) : 1;
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      int64_t col[VPT];
      bool in[VPT];
      VecT v[VPT];
#pragma unroll
      for (int kv = 0; kv < VPT; ++kv) {
        col[kv] = tile * kTile + int64_t(kv * G + lane) * VEC;
        in[kv] = col[kv] < a.dim;  // dim % VEC == 0, so a vector is wholly in or out
        v[kv] = (need_wg && in[kv]) ? load_nc<T, VEC>(V + col[kv]) : zero_vec<T, VEC>();
      }
      A acc[VPT][VEC];
#pragma unroll
      for (int kv = 0; kv < VPT; ++kv)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[kv][e] = A(0);

      for (int64_t c = pb; c < pe; c += R) {
        // Lane r of each shuffle unit loads position c + r (and keeps it for the store of
        // that position's weight gradient); its token and weight are broadcast.
        uint32_t my_pos = 0, my_tok = 0;
        A my_w = A(0);
        const bool mine = wl < R && c + wl < pe;
        if (mine) {
          my_pos = a.positions[c + wl];
          my_tok = my_pos / bag;
          my_w = load_f32_or<T>(a.weights, a.w_f32, my_pos);
        }
        uint32_t tok[R];
        A w[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          tok[r] = __shfl_sync(mask, my_tok, r, W);
          w[r] = __shfl_sync(mask, my_w, r, W);
        }
        VecT g[R][VPT];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const T* go = GO + int64_t(tok[r]) * a.dim;
#pragma unroll
          for (int kv = 0; kv < VPT; ++kv)
            g[r][kv] = (c + r < pe && in[kv]) ? load_nc<T, VEC>(go + col[kv]) : zero_vec<T, VEC>();
        }
        // One sweep per row: the row gradient, and (when needed) the row's dot with the
        // value row, summed over the group. The dot order is fixed per lane, then the
        // butterfly, then (G > 32) the warps in order: deterministic.
        A d[R];
        if (!need_wg) {
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int kv = 0; kv < VPT; ++kv) fma_vec(acc[kv], w[r], g[r][kv]);
          continue;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          d[r] = A(0);
#pragma unroll
          for (int kv = 0; kv < VPT; ++kv) fma_dot_vec(acc[kv], w[r], g[r][kv], v[kv], d[r]);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) d[r] = group_sum<W>(mask, d[r]);
        if constexpr (G <= kWarpSize) {
          A mine_d = A(0);
#pragma unroll
          for (int r = 0; r < R; ++r)
            if (wl == r) mine_d = d[r];
          if (mine) store_f32_or<T>(a.weights_grad, a.w_f32, my_pos, mine_d);
        } else if (wl == 0) {
          // Lane 0 of each warp owns its warp's slots: across tiles the same thread adds.
          const int wi = threadIdx.x / kWarpSize;
#pragma unroll
          for (int r = 0; r < R; ++r) {
            if (c + r < pe) {
              A& slot = warp_dots[wi][c - pb + r];
              slot = tile == 0 ? d[r] : slot + d[r];
            }
          }
        }
      }

#pragma unroll
      for (int kv = 0; kv < VPT; ++kv) {
        if (!in[kv]) continue;
        if (part_row != nullptr) {
          Vec<A, VEC> o;
#pragma unroll
          for (int e = 0; e < VEC; ++e) o.v[e] = acc[kv][e];
          store_vec(part_row + col[kv], o);
        } else {
          VecT o;
#pragma unroll
          for (int e = 0; e < VEC; ++e) o.v[e] = from_acc<T>(acc[kv][e]);
          store_vec(out_row + col[kv], o);
        }
      }
    }

    if constexpr (G > kWarpSize) {
      if (need_wg) {
        __syncthreads();  // every warp's slots are written
        for (int64_t i = threadIdx.x; i < pe - pb; i += kBlock) {
          A total = warp_dots[0][i];
#pragma unroll
          for (int wi = 1; wi < kWarps; ++wi) total += warp_dots[wi][i];
          store_f32_or<T>(a.weights_grad, a.w_f32, a.positions[pb + i], total);
        }
        __syncthreads();  // the next segment rewrites the slots
      }
    }
  }
}

constexpr int kReduceBlock = 256;

// rows_grad[u] = sum of the run's partial rows, in segment order.
template <typename T>
__global__ void __launch_bounds__(kReduceBlock)
    embedding_bag_backward_reduce_kernel(const BackwardArgs a) {
  using A = acc_t<T>;
  const A* P = static_cast<const A*>(a.partial);
  T* RG = static_cast<T*>(a.rows_grad);
  const int64_t n_chunks = ceil_div(a.dim, kReduceBlock);
  const int64_t n_long_runs = backward_counts(a).n_long_runs;
  for (int64_t item = blockIdx.x; item < n_long_runs * n_chunks; item += gridDim.x) {
    const int64_t u = a.long_runs[item / n_chunks];
    const int64_t col = (item % n_chunks) * kReduceBlock + threadIdx.x;
    if (col >= a.dim) continue;
    const int64_t n_seg = ceil_div(int64_t(a.run_begin[u + 1]) - a.run_begin[u], kSegment);
    const A* p = P + int64_t(a.plan[u].long_slot) * a.dim + col;
    A s = p[0];
    // Four loads in flight, added strictly in segment order.
    int64_t i = 1;
    for (; i + 4 <= n_seg; i += 4) {
      const A x0 = p[i * a.dim], x1 = p[(i + 1) * a.dim], x2 = p[(i + 2) * a.dim],
              x3 = p[(i + 3) * a.dim];
      s += x0;
      s += x1;
      s += x2;
      s += x3;
    }
    for (; i < n_seg; ++i) s += p[i * a.dim];
    RG[row_grad_slot(a, u, a.keys[a.run_begin[u]]) * a.dim + col] = from_acc<T>(s);
  }
}

// ---------------------------------------------------------------------------------------
// Short-run schedule, for launches where every run is one segment (no partial rows) and
// most runs are one or two positions: the segment kernel would spend a whole group's
// setup (and registers sized for R positions of one run) on one or two rows. Here a group
// takes kShortUnit consecutive runs and walks their sorted positions in chunks of R, so
// the R positions in flight belong to different runs: R grad_out rows and the value rows
// of the runs that start in the chunk load together. Positions are taken one at a time in
// the chunk; a run's row gradient is stored (and the accumulator cleared) at its last
// position, so each column is summed in position order, exactly as the segment kernel
// does. The group shape (G, VPT, VEC) is the segment kernel's for the same launch, so each
// position's weight gradient has the same lane split, the same per-lane order and the
// same butterfly: results are bitwise those of the segment kernel. Only shapes of one warp
// or less (rows of up to 128 accesses) have this schedule; wider rows keep a block of the
// segment kernel busy per position, and split the weight gradient across warps (launch
// rule: use_short_run_backward; with counts on the device, both_schedules).

// Runs per group unit: a unit costs two dependent loads (its run_begin bounds, then its
// first chunk's positions) before its chunks pipeline, so several runs share them; few
// enough that units stay short. A unit's work is all positions of its runs: up to
// kShortUnit * kSegment if hot runs of nearly a segment each fall together, which the
// launch rule (short runs on average) makes unlikely but does not exclude.
constexpr int64_t kShortUnit = 16;
constexpr int kShortBlock = 128;

// Blocks per SM asked of the compiler (__launch_bounds__): at least 5 blocks of 128 threads
// (at most 102 registers, 20 warps per SM) for one access per lane, 3 (168 registers, 12
// warps) for four accesses per lane, whose 2 * R rows in flight and accumulators alone take
// 64-80 registers with 16-byte vectors. ptxas then needs 50-96 and 128-145 registers
// without spills (sm_80, sm_90); tighter bounds spill. Either way a warp keeps about 4 KiB
// (one access per lane) or 8 KiB (four) of rows in flight.
constexpr int short_min_blocks(int vpt) { return vpt == 1 ? 5 : 3; }

template <typename T, int VEC, int G, int VPT, int R>
__global__ void __launch_bounds__(kShortBlock, short_min_blocks(VPT))
    embedding_bag_backward_short_kernel(const BackwardArgs a) {
  using A = acc_t<T>;
  using VecT = Vec<T, VEC>;
  static_assert(G <= kWarpSize && R <= G, "a group is at most a warp; a lane per position");
  constexpr int kGroups = kShortBlock / G;
  const int lane = threadIdx.x % G;
  const int group_base = static_cast<int>(threadIdx.x % kWarpSize) / G * G;
  const unsigned mask = group_mask<G>();
  const bool need_wg = a.weights_grad != nullptr;
  const T* GO = static_cast<const T*>(a.grad_out);
  const T* VAL = static_cast<const T*>(a.values);
  T* RG = static_cast<T*>(a.rows_grad);
  const auto bag = static_cast<uint32_t>(a.bag);  // bag <= lookups < 2^32

  int64_t col[VPT];
  bool in[VPT];
#pragma unroll
  for (int kv = 0; kv < VPT; ++kv) {
    col[kv] = int64_t(kv * G + lane) * VEC;
    in[kv] = col[kv] < a.dim;  // dim % VEC == 0, so a vector is wholly in or out
  }

  const BackwardCounts counts = backward_counts(a);
  if (a.both_schedules && !short_schedule_picked(a, counts, a.dim / VEC)) return;  // whole grid
  const int64_t n_runs = counts.n_runs;
  const int64_t n_units = ceil_div(n_runs, kShortUnit);
  for (int64_t unit = int64_t(blockIdx.x) * kGroups + threadIdx.x / G; unit < n_units;
       unit += int64_t(gridDim.x) * kGroups) {
    const int64_t u0 = unit * kShortUnit;
    const int64_t u_end = u0 + kShortUnit < n_runs ? u0 + kShortUnit : n_runs;
    const int64_t begin = a.run_begin[u0], end = a.run_begin[u_end];
    int64_t u = u0 - 1;        // run of the last position taken
    bool chunk_starts = true;  // the chunk's first position starts a run
    VecT v[VPT];               // value row of run u
    A acc[VPT][VEC];
#pragma unroll
    for (int kv = 0; kv < VPT; ++kv) {
      v[kv] = zero_vec<T, VEC>();
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[kv][e] = A(0);
    }

    // Lane r holds the sorted position c + r of the next chunk, its row and the next
    // sorted key (to tell whether it ends its run), loaded a chunk ahead: a chunk then
    // waits on one round trip (its rows and weights), not two. Lanes past the unit's end
    // keep stale values that they never use.
    uint32_t ahead_pos = 0, ahead_key = 0, ahead_next_key = 0;
    auto load_ahead = [&](int64_t c) {
      if (lane < R && c + lane < end) {
        ahead_pos = a.positions[c + lane];
        ahead_key = a.keys[c + lane];
        if (c + lane + 1 < end) ahead_next_key = a.keys[c + lane + 1];
      }
    };
    load_ahead(begin);
    for (int64_t c = begin; c < end; c += R) {
      // Lane r takes position c + r: its token, weight and row, and whether it ends its
      // run (the next sorted key differs, or the unit ends).
      const bool mine = lane < R && c + lane < end;
      uint32_t my_pos = 0, my_tok = 0, my_key = 0;
      bool my_last = false;
      A my_w = A(0);
      if (mine) {
        my_pos = ahead_pos;
        my_key = ahead_key;
        my_last = c + lane + 1 == end || ahead_next_key != my_key;
        my_tok = my_pos / bag;
        my_w = load_f32_or<T>(a.weights, a.w_f32, my_pos);
      }
      const unsigned lasts = __ballot_sync(mask, my_last) >> group_base;
      uint32_t tok[R], key[R];
      A w[R];
      bool starts[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        tok[r] = __shfl_sync(mask, my_tok, r, G);
        key[r] = __shfl_sync(mask, my_key, r, G);
        w[r] = __shfl_sync(mask, my_w, r, G);
        starts[r] = r == 0 ? chunk_starts : ((lasts >> (r - 1)) & 1u) != 0;
      }
      // Every row of the chunk in flight: grad_out for each position, values for each
      // position that starts a run.
      VecT g[R][VPT], vn[R][VPT];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const bool valid = c + r < end;
        const T* go = GO + int64_t(tok[r]) * a.dim;
        const T* vr = VAL + int64_t(key[r]) * a.dim;
#pragma unroll
        for (int kv = 0; kv < VPT; ++kv) {
          g[r][kv] = (valid && in[kv]) ? load_nc<T, VEC>(go + col[kv]) : zero_vec<T, VEC>();
          vn[r][kv] = (need_wg && valid && starts[r] && in[kv]) ? load_nc<T, VEC>(vr + col[kv])
                                                                : zero_vec<T, VEC>();
        }
      }
      if (c + R < end) load_ahead(c + R);  // in flight with this chunk's rows
      // Positions in order: the same per-position sweep as the segment kernel.
      A d[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        d[r] = A(0);
        if (c + r >= end) continue;
        if (starts[r]) {
          ++u;
#pragma unroll
          for (int kv = 0; kv < VPT; ++kv) v[kv] = vn[r][kv];
          if (lane == 0 && a.rows_out != nullptr) a.rows_out[u] = key[r];
        }
#pragma unroll
        for (int kv = 0; kv < VPT; ++kv) {
          if (need_wg)
            fma_dot_vec(acc[kv], w[r], g[r][kv], v[kv], d[r]);
          else
            fma_vec(acc[kv], w[r], g[r][kv]);
        }
        if ((lasts >> r) & 1u) {
#pragma unroll
          for (int kv = 0; kv < VPT; ++kv) {
            if (in[kv]) {
              VecT o;
#pragma unroll
              for (int e = 0; e < VEC; ++e) o.v[e] = from_acc<T>(acc[kv][e]);
              store_vec(RG + row_grad_slot(a, u, key[r]) * a.dim + col[kv], o);
            }
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[kv][e] = A(0);
          }
        }
      }
      chunk_starts = ((lasts >> (R - 1)) & 1u) != 0;
      if (need_wg) {
#pragma unroll
        for (int r = 0; r < R; ++r) d[r] = group_sum<G>(mask, d[r]);
        A mine_d = A(0);
#pragma unroll
        for (int r = 0; r < R; ++r)
          if (lane == r) mine_d = d[r];
        if (mine) store_f32_or<T>(a.weights_grad, a.w_f32, my_pos, mine_d);
      }
    }
  }
}

// Launch shape from the row length in accesses (n = dim / VEC): sub-warps for short rows,
// a warp with four accesses per lane up to 128 accesses (2 KiB of bf16), a block of 128
// up to 512, then a tiled block of 256. Calls f.template operator()<G, VPT, R, TILED>();
// the block has max(G, 128) threads.
template <int VEC, typename F>
void with_backward_shape(int64_t n, F&& f) {
  if (n <= 4) return f.template operator()<4, 1, 4, false>();
  if constexpr (VEC > 1) {
    if (n <= 8) return f.template operator()<8, 1, 8, false>();
    if (n <= 16) return f.template operator()<16, 1, 8, false>();
  }
  if (n <= 32) return f.template operator()<32, 1, 8, false>();
  if (n <= 128) return f.template operator()<32, 4, 4, false>();
  if constexpr (VEC > 1) {
    if (n <= 512) return f.template operator()<128, 4, 4, false>();
  }
  return f.template operator()<256, 2, 4, true>();
}

// Positions in flight per group in the short-run schedule: 4 for one access per lane, 2 for
// four, keeping the group's value and grad_out slices (2 * R * VPT vectors) within the
// register budget of short_min_blocks.
constexpr int short_positions(int vpt) { return vpt > 1 ? 2 : 4; }

// The short-run launch shape: the segment kernel's G and VPT for the same row (so the
// weight gradient's lane split is the same), with short_positions in flight. Calls
// f.template operator()<G, VPT, R>() for rows of up to 128 accesses (one warp or less),
// nothing for wider rows (use_short_run_backward never picks them).
template <int VEC, typename F>
void with_short_run_shape(int64_t n, F&& f) {
  with_backward_shape<VEC>(n, [&]<int G, int VPT, int R, bool TILED>() {
    if constexpr (G <= kWarpSize && !TILED) f.template operator()<G, VPT, short_positions(VPT)>();
  });
}

}  // namespace
}  // namespace memory_ext::cuda

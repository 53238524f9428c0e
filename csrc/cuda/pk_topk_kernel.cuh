// Fused product-key scoring + exact top-k: the work of one CTA.
//
// A CTA owns 16 * nwarps tokens of one head; warp w owns tokens 16w..16w+15 of the block
// from the first score to the last output. For each half of the query the CTA streams the
// head's sub-keys in tiles of 64, scores the tile on tensor cores (bf16/fp16, or fp32
// rounded to TF32 where the caller allows it; fp32 accumulation) or with FMAs (fp32/fp64),
// and each warp folds its 16 x 64 score tile into a running top list per token: one
// comparison with the current k-th best rejects most scores; survivors go to a per-token
// buffer in shared memory that is sorted and merged into the list when it fills. No score
// leaves the SM. Finally each warp combines the two sorted half lists of each of its
// tokens over the pairs with rank product <= k and writes the k best.
//
// Written in plain CUDA and the helpers of memory_ext/cuda_device.cuh and cuda_sm80.cuh,
// with no torch types, so tests/pk_topk_emulate.cpp runs this source on the CPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "memory_ext/cuda_device.cuh"
#include "memory_ext/cuda_sm80.cuh"
#include "pk_topk_common.cuh"

namespace memory_ext::cuda::pk {

// ---------------------------------------------------------------------------------------
// Input element kinds. bf16/fp16 stay raw 16-bit patterns until they reach a tensor core
// or a conversion, so the kernel needs no half-precision arithmetic types.

template <typename RawT, typename ScoreT>
struct Input {
  using Raw = RawT;
  using Score = ScoreT;
};
struct InF32 : Input<float, float> {};
struct InF64 : Input<double, double> {};
struct InBF16 : Input<uint16_t, float> {};  // bf16 bits
struct InF16 : Input<uint16_t, float> {};   // fp16 bits

template <class In>
MEMORY_EXT_DEVICE typename In::Score to_score(typename In::Raw v) {
  if constexpr (std::is_same_v<In, InBF16>) {
    return bit_cast<float>(static_cast<uint32_t>(v) << 16);
  } else if constexpr (std::is_same_v<In, InF16>) {
    return half_bits_to_float(v);
  } else {
    return v;
  }
}

MEMORY_EXT_DEVICE float madd(float a, float b, float c) { return fmaf(a, b, c); }
MEMORY_EXT_DEVICE double madd(double a, double b, double c) { return fma(a, b, c); }

template <typename S>
MEMORY_EXT_DEVICE S negative_infinity() {
  if constexpr (std::is_same_v<S, float>) {
    return bit_cast<float>(0xFF800000u);
  } else {
    return bit_cast<double>(0xFFF0000000000000ull);
  }
}

// ---------------------------------------------------------------------------------------
// Warp-cooperative sorting of keys in shared memory. Every lane runs every stage; a stage
// touches disjoint pairs, and warp_sync orders the stages.

// Index of the lower element of compare-exchange pair p at distance j (j a power of two):
// p with a zero bit inserted at bit log2(j).
MEMORY_EXT_HD int pair_low(int p, int j) { return ((p & ~(j - 1)) << 1) | (p & (j - 1)); }

// Sorts a[0..n) in descending key order; n is a power of two.
template <typename Key>
MEMORY_EXT_DEVICE void bitonic_sort_desc(Key* a, int n) {
  const int lane = lane_id();
  for (int size = 2; size <= n; size <<= 1) {
    for (int j = size >> 1; j > 0; j >>= 1) {
      for (int p = lane; p < n / 2; p += kWarpSize) {
        const int i = pair_low(p, j);
        const Key x = a[i], y = a[i + j];
        const bool descending = (i & size) == 0;
        if (descending ? (y > x) : (x > y)) {
          a[i] = y;
          a[i + j] = x;
        }
      }
      __syncwarp();
    }
  }
}

// Sorts a bitonic sequence a[0..n) in descending order; n is a power of two.
template <typename Key>
MEMORY_EXT_DEVICE void bitonic_merge_desc(Key* a, int n) {
  const int lane = lane_id();
  for (int j = n >> 1; j > 0; j >>= 1) {
    for (int p = lane; p < n / 2; p += kWarpSize) {
      const int i = pair_low(p, j);
      const Key x = a[i], y = a[i + j];
      if (y > x) {
        a[i] = y;
        a[i + j] = x;
      }
    }
    __syncwarp();
  }
}

// Folds buf[0..count) into the descending list[0..kp), keeping the kp best. The buffer is
// padded to a power of two and sorted; then list[i] = max(list[i], buf[kp - 1 - i]) holds
// the kp best of both and is bitonic (descending, then ascending), so one bitonic merge
// sorts it.
template <typename Key>
MEMORY_EXT_DEVICE void flush_buffer(Key* list, Key* buf, int count, int kp) {
  const int lane = lane_id();
  const int n = next_pow2(count);
  for (int i = count + lane; i < n; i += kWarpSize) buf[i] = Key::sentinel();
  __syncwarp();  // candidates appended by every lane are visible
  bitonic_sort_desc(buf, n);
  for (int i = lane; i < kp; i += kWarpSize) {
    const int m = kp - 1 - i;
    if (m < n) {
      const Key b = buf[m];
      if (b > list[i]) list[i] = b;
    }
  }
  __syncwarp();
  bitonic_merge_desc(list, kp);
}

// Running top-k of one token row, driven by its warp 32 candidates at a time.
template <typename Key>
struct RowSelect {
  using S = typename Key::Score;
  Key* list;  // kp keys, descending; list[k - 1] is the k-th best so far
  Key* buf;   // kBufCap keys
  int k;
  int kp;
  int count;  // keys waiting in buf (same value in every lane)
  Key thr;
  S thr_score;

  MEMORY_EXT_DEVICE void refresh() {
    thr = list[k - 1];
    thr_score = thr.empty() ? negative_infinity<S>() : thr.score();
  }

  // Each lane offers one candidate (ignored when !valid). Warp-collective.
  MEMORY_EXT_DEVICE void offer(bool valid, S score, uint32_t index) {
    if (count > kBufCap - kWarpSize) {
      flush_buffer(list, buf, count, kp);
      count = 0;
      refresh();
    }
    // The float comparison rejects almost everything once the list is full; it is
    // written so that NaN and ties fall through to the exact key comparison.
    const bool maybe = valid && !(score < thr_score);
    if (!__any_sync(kFullMask, maybe)) return;
    const Key key = Key::make(score, index);
    const bool pass = maybe && key > thr;
    const uint32_t mask = __ballot_sync(kFullMask, pass);
    if (pass) buf[count + __popc(mask & lanemask_lt())] = key;
    count += __popc(mask);
  }

  MEMORY_EXT_DEVICE void finish() {
    if (count > 0) {
      flush_buffer(list, buf, count, kp);
      count = 0;
    }
  }
};

// ---------------------------------------------------------------------------------------
// Per-token state in shared memory: [list of half 0 | list of half 1 | buffer].

template <typename Key>
MEMORY_EXT_DEVICE Key* row_state(const Params& p, char* smem, int row) {
  return reinterpret_cast<Key*>(smem + p.layout.off_state + row * p.layout.row_bytes);
}

MEMORY_EXT_DEVICE int* row_counts(const Params& p, char* smem) {
  return reinterpret_cast<int*>(smem + p.layout.off_count);
}

template <typename Key>
MEMORY_EXT_DEVICE void init_rows(const Params& p, char* smem, int warp) {
  const int lane = lane_id();
  for (int r = 0; r < kRowsPerWarp; ++r) {
    Key* s = row_state<Key>(p, smem, warp * kRowsPerWarp + r);
    for (int i = lane; i < 2 * p.kp; i += kWarpSize) s[i] = Key::sentinel();
  }
  if (lane < kRowsPerWarp) row_counts(p, smem)[warp * kRowsPerWarp + lane] = 0;
  __syncwarp();
}

// Folds the warp's tile of scores (16 rows x kTileKeys, row stride kScratchStride) for
// sub-keys n0.. into the running lists of half x.
template <typename Key>
MEMORY_EXT_DEVICE void select_tile(const Params& p, char* smem, const typename Key::Score* scratch,
                                   int warp, int x, int n0, int64_t t0) {
  const int lane = lane_id();
  int* counts = row_counts(p, smem);
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = warp * kRowsPerWarp + r;
    if (t0 + row >= p.tokens) break;  // rows past the last token are never filled
    Key* s = row_state<Key>(p, smem, row);
    RowSelect<Key> sel{s + x * p.kp, s + 2 * p.kp, p.k, p.kp, counts[row], Key::sentinel(), 0};
    sel.refresh();
    const typename Key::Score* scores = scratch + r * kScratchStride;
#pragma unroll
    for (int c = 0; c < kTileKeys / kWarpSize; ++c) {
      const int j = c * kWarpSize + lane;
      sel.offer(n0 + j < p.n_keys, scores[j], static_cast<uint32_t>(n0 + j));
    }
    __syncwarp();  // every lane has read counts[row]
    if (lane == 0) counts[row] = sel.count;
  }
  __syncwarp();  // the scratch tile may be overwritten; counts are visible
}

// Flushes what is left in each row's buffer: the list of half x is then final.
template <typename Key>
MEMORY_EXT_DEVICE void finish_rows(const Params& p, char* smem, int warp, int x, int64_t t0) {
  const int lane = lane_id();
  int* counts = row_counts(p, smem);
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = warp * kRowsPerWarp + r;
    if (t0 + row >= p.tokens) break;
    Key* s = row_state<Key>(p, smem, row);
    RowSelect<Key> sel{s + x * p.kp, s + 2 * p.kp, p.k, p.kp, counts[row], Key::sentinel(), 0};
    sel.finish();
    __syncwarp();
    if (lane == 0) counts[row] = 0;
  }
  __syncwarp();
}

// The (a, b) half-rank pairs with (a + 1)(b + 1) <= k, a in the low 16 bits; written into
// the stage region, which is free once both halves are scanned.
MEMORY_EXT_DEVICE void build_pair_table(const Params& p, char* smem, int tid, int nthreads) {
  auto* table = reinterpret_cast<uint32_t*>(smem);
  uint32_t* first = table + p.npairs;  // first[a]: where row a of the table starts
  if (tid == 0) {
    uint32_t o = 0;
    for (int a = 0; a < p.k; ++a) {
      first[a] = o;
      o += static_cast<uint32_t>(p.k / (a + 1));
    }
    first[p.k] = o;
  }
  __syncthreads();
  for (int a = tid; a < p.k; a += nthreads) {
    const int nb = p.k / (a + 1);
    for (int b = 0; b < nb; ++b)
      table[first[a] + b] = static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
  }
  __syncthreads();
}

// Exact combine of each of the warp's tokens and the write of its k results.
template <typename Key>
MEMORY_EXT_DEVICE void combine_rows(const Params& p, char* smem, int warp, int h, int64_t t0) {
  using S = typename Key::Score;
  const int lane = lane_id();
  const auto* table = reinterpret_cast<const uint32_t*>(smem);
  Key* list = reinterpret_cast<Key*>(smem + p.layout.off_scratch + warp * p.layout.scratch_bytes);
  Key* buf = list + p.kp;
  auto* out_scores = static_cast<S*>(p.scores);
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = warp * kRowsPerWarp + r;
    const int64_t t = t0 + row;
    if (t >= p.tokens) break;
    for (int i = lane; i < p.kp; i += kWarpSize) list[i] = Key::sentinel();
    __syncwarp();
    const Key* half0 = row_state<Key>(p, smem, row);
    const Key* half1 = half0 + p.kp;
    RowSelect<Key> sel{list, buf, p.k, p.kp, 0, Key::sentinel(), 0};
    sel.refresh();
    for (int q0 = 0; q0 < p.npairs; q0 += kWarpSize) {
      const int q = q0 + lane;
      const bool valid = q < p.npairs;
      S score = 0;
      uint32_t index = 0;
      if (valid) {
        const uint32_t e = table[q];
        const Key a = half0[e & 0xFFFFu], b = half1[e >> 16];
        score = a.score() + b.score();  // in the score dtype, like the CPU kernel
        index = a.index() * static_cast<uint32_t>(p.n_keys) + b.index();
      }
      sel.offer(valid, score, index);
    }
    sel.finish();
    __syncwarp();
    const int64_t o = (t * p.heads + h) * p.k;
    for (int j = lane; j < p.k; j += kWarpSize) {
      const Key e = list[j];
      out_scores[o + j] = e.score();
      p.indices[o + j] = static_cast<int64_t>(e.index());
    }
    __syncwarp();  // the list is reset for the next token
  }
}

// ---------------------------------------------------------------------------------------
// Tensor-core path: bf16 / fp16 on mma.m16n8k16, or fp32 rounded to TF32 on mma.m16n8k8,
// fp32 accumulation either way. The warp's query rows live in registers as mma A
// fragments for the whole half (kHk k-steps) or, for wider halves (kHk == kStreamedQuery),
// in shared memory as operand words that each chunk loads; sub-key chunks of 64 keys x 128
// bytes stream through a 3-stage cp.async pipeline shared by the CTA.
//
// Both instructions take their fragments as 32-bit words, two 16-bit elements or one TF32
// value each, and a k-step spans 8 words of every row (16 or 8 dims): lane (g, c) holds
// words c and c + 4 of the step, of query rows g and g + 8 (A) and of key g (B). Counted
// in words the two paths are one kernel; only the packing of a word and the instruction
// differ (MmaInput, mma_step).

template <class In>
struct MmaInput {
  static_assert(std::is_same_v<In, InBF16> || std::is_same_v<In, InF16> ||
                    std::is_same_v<In, InF32>,
                "tensor cores take bf16, fp16 or fp32 (as TF32)");
  using Elem = typename In::Raw;  // raw 16-bit patterns or float
  static constexpr int kPerWord = 4 / static_cast<int>(sizeof(Elem));
  static constexpr int kStepDims = 8 * kPerWord;
  static constexpr int kChunkDims = kMmaChunkBytes / static_cast<int>(sizeof(Elem));
  static constexpr int kRowElems = kMmaRowWords * kPerWord;  // stage row stride
};

// D += A * B for one k-step; TF32 B words are rounded here, as they come from the raw
// float sub-keys in shared memory.
template <class In>
MEMORY_EXT_DEVICE void mma_step(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<In, InF32>) {
    mma_1688_tf32(d, a, to_tf32(bit_cast<float>(b0)), to_tf32(bit_cast<float>(b1)));
  } else {
    mma_16816<std::is_same_v<In, InBF16>>(d, a, b0, b1);
  }
}

// One query row at head h: its element offset, and whether the token exists (rows past
// the last token read as zeros).
struct QueryRow {
  int64_t base;
  bool valid;

  MEMORY_EXT_DEVICE static QueryRow make(const Params& p, int64_t token, int h) {
    const bool valid = token < p.tokens;
    return {(valid ? token : 0) * p.q_stride_t + static_cast<int64_t>(h) * p.q_stride_h, valid};
  }

  // Operand word w of half x: elements 2w and 2w + 1, low element first (16-bit), or
  // element w rounded to TF32; dims past the half are zeros.
  template <class In>
  MEMORY_EXT_DEVICE uint32_t word(const Params& p, int x, int w) const {
    if constexpr (MmaInput<In>::kPerWord == 2) {
      return static_cast<uint32_t>(element<In>(p, x, 2 * w)) |
             (static_cast<uint32_t>(element<In>(p, x, 2 * w + 1)) << 16);
    } else {
      return to_tf32(element<In>(p, x, w));
    }
  }

  template <class In>
  MEMORY_EXT_DEVICE typename MmaInput<In>::Elem element(const Params& p, int x, int d) const {
    using Elem = typename MmaInput<In>::Elem;
    return (valid && d < p.half)
               ? static_cast<const Elem*>(
                     p.query)[base + static_cast<int64_t>(x * p.half + d) * p.q_stride_d]
               : Elem{0};
  }
};

// The two query rows of one lane's A fragments: tokens g and g + 8 of its warp.
struct FragmentRows {
  QueryRow lo, hi;

  MEMORY_EXT_DEVICE static FragmentRows make(const Params& p, int64_t token_lo, int h) {
    return {QueryRow::make(p, token_lo, h), QueryRow::make(p, token_lo + 8, h)};
  }
};

// The A fragments of half x for the whole half: a[s] covers words 8 s .. 8 s + 7.
template <class In, int kHk>
MEMORY_EXT_DEVICE void load_query_fragments(const Params& p, const FragmentRows& rows, int x,
                                            int quad_lane, uint32_t (&a)[kHk][4]) {
#pragma unroll
  for (int s = 0; s < kHk; ++s) {
    const int w = s * 8 + quad_lane;
    a[s][0] = rows.lo.word<In>(p, x, w);
    a[s][1] = rows.hi.word<In>(p, x, w);
    a[s][2] = rows.lo.word<In>(p, x, w + 4);
    a[s][3] = rows.hi.word<In>(p, x, w + 4);
  }
}

// Streamed query: the warp's 16 rows of half x as operand words in its part of the query
// region (rows query_row_words apart, zero-padded to whole chunks). Consecutive lanes read
// consecutive elements of a row.
template <class In>
MEMORY_EXT_DEVICE void stage_query_half(const Params& p, uint32_t* query, int64_t token0, int h,
                                        int x, int lane) {
  const int stride = p.layout.query_row_words, words = stride - 4;
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const QueryRow row = QueryRow::make(p, token0 + r, h);
    for (int w = lane; w < words; w += kWarpSize) query[r * stride + w] = row.word<In>(p, x, w);
  }
  __syncwarp();
}

// The ring of sub-key chunks of one half: load i is tile i / n_chunks, chunk i % n_chunks,
// into stage i % kStages. Invariant: when load i is consumed, loads 0..i+kStages-2 have
// been committed as one group each (empty groups past the end), so waiting until at most
// kStages-2 groups are pending completes load i; the __syncthreads that follows also
// guarantees that every warp is done with stage (i - 1) % kStages, which load
// i + kStages - 1 overwrites.
template <class In>
struct KeyChunkRing {
  using M = MmaInput<In>;
  using Elem = typename M::Elem;
  static constexpr int kStageElems = kTileKeys * M::kRowElems;
  const Elem* keys;  // (n_keys, half) sub-keys of this head and half
  Elem* stages;
  int n_chunks, n_loads;
  int issued = 0, consumed = 0;

  // Keys and dims past the end are zero-filled: zero A columns times garbage could still
  // give NaN.
  MEMORY_EXT_DEVICE void load(const Params& p, int i, int tid, int nthreads) const {
    const int tile = i / n_chunks, ch = i - tile * n_chunks;
    const int n0 = tile * kTileKeys, d0 = ch * M::kChunkDims;
    Elem* dst = stages + (i % kStages) * kStageElems;
    if (p.vector_keys) {                            // half is a whole number of 16-byte pieces
      constexpr int kPieces = kMmaChunkBytes / 16;  // per key row
      constexpr int kPieceElems = 16 / static_cast<int>(sizeof(Elem));
      for (int e = tid; e < kTileKeys * kPieces; e += nthreads) {
        const int r = e / kPieces, d = (e % kPieces) * kPieceElems;
        const bool ok = n0 + r < p.n_keys && d0 + d < p.half;
        const Elem* src = ok ? keys + static_cast<int64_t>(n0 + r) * p.half + d0 + d : keys;
        cp_async_16(dst + r * M::kRowElems + d, src, ok ? 16 : 0);
      }
    } else {
      for (int e = tid; e < kTileKeys * M::kChunkDims; e += nthreads) {
        const int r = e / M::kChunkDims, d = e % M::kChunkDims;
        const bool ok = n0 + r < p.n_keys && d0 + d < p.half;
        dst[r * M::kRowElems + d] =
            ok ? keys[static_cast<int64_t>(n0 + r) * p.half + d0 + d] : Elem{0};
      }
    }
  }

  // Starts the next load (an empty group past the end).
  MEMORY_EXT_DEVICE void issue(const Params& p, int tid, int nthreads) {
    if (issued < n_loads) load(p, issued, tid, nthreads);
    cp_async_commit();
    ++issued;
  }

  MEMORY_EXT_DEVICE void start(const Params& p, int tid, int nthreads) {
    for (int s = 0; s < kStages - 1; ++s) issue(p, tid, nthreads);
  }

  // Waits for the oldest load, refills the stage freed before it, and returns the chunk as
  // rows of kMmaRowWords words.
  MEMORY_EXT_DEVICE const uint32_t* next(const Params& p, int tid, int nthreads) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    issue(p, tid, nthreads);
    return reinterpret_cast<const uint32_t*>(stages + (consumed++ % kStages) * kStageElems);
  }
};

// acc += k-step s of a chunk for the 8-key slices of the tile, A fragments a.
template <class In>
MEMORY_EXT_DEVICE void mma_tile_step(const uint32_t* chunk, int s, const uint32_t (&a)[4], int lane,
                                     float (&acc)[kTileKeys / 8][4]) {
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int nt = 0; nt < kTileKeys / 8; ++nt) {
    // B[kk][n] = sub-key n, dim kk: words c and c + 4 of the step, of key nt*8 + g.
    const uint32_t* bp = chunk + (nt * 8 + g) * kMmaRowWords + s * 8 + c;
    mma_step<In>(acc[nt], a, bp[0], bp[4]);
  }
}

MEMORY_EXT_DEVICE void zero_tile(float (&acc)[kTileKeys / 8][4]) {
#pragma unroll
  for (int nt = 0; nt < kTileKeys / 8; ++nt)
    acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
}

// acc = this warp's 16 tokens x 64 keys of one tile, over every chunk of the half.
template <class In, int kHk>
MEMORY_EXT_DEVICE void score_tile_mma(const Params& p, KeyChunkRing<In>& ring,
                                      const uint32_t (&a)[kHk][4], int lane, int tid, int nthreads,
                                      float (&acc)[kTileKeys / 8][4]) {
  constexpr int kStepsPerChunk = MmaInput<In>::kChunkDims / MmaInput<In>::kStepDims;
  static_assert(kStepsPerChunk == 4 && kHk % kStepsPerChunk == 0, "4 k-steps per chunk");
  const int k_steps = (p.half + MmaInput<In>::kStepDims - 1) / MmaInput<In>::kStepDims;
  zero_tile(acc);
#pragma unroll
  for (int ch = 0; ch < kHk / kStepsPerChunk; ++ch) {
    if (ch < ring.n_chunks) {  // uniform across the CTA
      const uint32_t* chunk = ring.next(p, tid, nthreads);
#pragma unroll
      for (int s = 0; s < kStepsPerChunk; ++s)
        if (ch * kStepsPerChunk + s < k_steps)
          mma_tile_step<In>(chunk, s, a[ch * kStepsPerChunk + s], lane, acc);
    }
  }
}

// The same with the query streamed: each k-step loads its A fragments from the warp's
// staged rows (word c and c + 4 of the step, rows g and g + 8).
template <class In>
MEMORY_EXT_DEVICE void score_tile_streamed(const Params& p, KeyChunkRing<In>& ring,
                                           const uint32_t* query, int lane, int tid, int nthreads,
                                           float (&acc)[kTileKeys / 8][4]) {
  constexpr int kStepsPerChunk = MmaInput<In>::kChunkDims / MmaInput<In>::kStepDims;
  const int g = lane >> 2, c = lane & 3;
  const int stride = p.layout.query_row_words;
  const int k_steps = (p.half + MmaInput<In>::kStepDims - 1) / MmaInput<In>::kStepDims;
  zero_tile(acc);
  for (int ch = 0; ch < ring.n_chunks; ++ch) {
    const uint32_t* chunk = ring.next(p, tid, nthreads);
#pragma unroll
    for (int s = 0; s < kStepsPerChunk; ++s) {
      if (ch * kStepsPerChunk + s < k_steps) {
        const uint32_t* ap = query + g * stride + (ch * kStepsPerChunk + s) * 8 + c;
        const uint32_t a[4] = {ap[0], ap[8 * stride], ap[4], ap[8 * stride + 4]};
        mma_tile_step<In>(chunk, s, a, lane, acc);
      }
    }
  }
}

// D[g][2c..2c+1] and D[g+8][2c..2c+1] of each 8-key slice into the warp's score tile.
MEMORY_EXT_DEVICE void store_tile_scores(float* scratch, const float (&acc)[kTileKeys / 8][4],
                                         int lane) {
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int nt = 0; nt < kTileKeys / 8; ++nt) {
    sts_f2(scratch + g * kScratchStride + nt * 8 + 2 * c, acc[nt][0], acc[nt][1]);
    sts_f2(scratch + (g + 8) * kScratchStride + nt * 8 + 2 * c, acc[nt][2], acc[nt][3]);
  }
}

template <class In, int kHk>
MEMORY_EXT_DEVICE void mma_block(const Params& p, int bx, int h, int tid, char* smem) {
  using Key = KeyF;
  using Elem = typename MmaInput<In>::Elem;
  const int nthreads = p.nwarps * kWarpSize;
  const int warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int64_t t0 = static_cast<int64_t>(bx) * (p.nwarps * kRowsPerWarp);
  auto* scratch =
      reinterpret_cast<float*>(smem + p.layout.off_scratch + warp * p.layout.scratch_bytes);
  const int n_tiles = (p.n_keys + kTileKeys - 1) / kTileKeys;
  constexpr bool kStreamed = kHk == kStreamedQuery;
  const int64_t warp_token0 = t0 + warp * kRowsPerWarp;
  const auto rows = FragmentRows::make(p, warp_token0 + (lane >> 2), h);
  uint32_t* query = reinterpret_cast<uint32_t*>(smem + p.layout.off_query) +
                    warp * kRowsPerWarp * p.layout.query_row_words;

  init_rows<Key>(p, smem, warp);
  for (int x = 0; x < 2; ++x) {
    [[maybe_unused]] uint32_t a[kStreamed ? 1 : kHk][4];
    if constexpr (kStreamed) {
      stage_query_half<In>(p, query, warp_token0, h, x, lane);
    } else {
      load_query_fragments<In, kHk>(p, rows, x, lane & 3, a);
    }
    const int n_chunks = (p.half + MmaInput<In>::kChunkDims - 1) / MmaInput<In>::kChunkDims;
    KeyChunkRing<In> ring{
        static_cast<const Elem*>(p.keys) + (static_cast<int64_t>(h) * 2 + x) * p.n_keys * p.half,
        reinterpret_cast<Elem*>(smem), n_chunks, n_tiles * n_chunks};
    ring.start(p, tid, nthreads);
    for (int tile = 0; tile < n_tiles; ++tile) {
      float acc[kTileKeys / 8][4];
      if constexpr (kStreamed) {
        score_tile_streamed<In>(p, ring, query, lane, tid, nthreads, acc);
      } else {
        score_tile_mma<In, kHk>(p, ring, a, lane, tid, nthreads, acc);
      }
      store_tile_scores(scratch, acc, lane);
      __syncwarp();
      select_tile<Key>(p, smem, scratch, warp, x, tile * kTileKeys, t0);
    }
    cp_async_wait<0>();
    __syncthreads();  // no warp reads a stage any more: the next half may refill them
    finish_rows<Key>(p, smem, warp, x, t0);
  }

  build_pair_table(p, smem, tid, nthreads);
  combine_rows<Key>(p, smem, warp, h, t0);
}

// ---------------------------------------------------------------------------------------
// Plain path (fp32 without TF32, fp64; bf16/fp16 where tensor cores cannot serve): query
// and sub-key chunks of 32 dims in shared memory, converted to the score type; lane l
// scores keys l and l + 32 of the tile against the warp's 16 tokens with FMAs in dimension
// order.

template <class In>
MEMORY_EXT_DEVICE void plain_block(const Params& p, int bx, int h, int tid, char* smem) {
  using S = typename In::Score;
  using Raw = typename In::Raw;
  using Key = typename KeyOf<S>::type;
  static_assert(kTileKeys == 2 * kWarpSize, "each lane scores two keys of a tile");
  const int nthreads = p.nwarps * kWarpSize;
  const int rows = p.nwarps * kRowsPerWarp;
  const int warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int64_t t0 = static_cast<int64_t>(bx) * rows;
  S* qs = reinterpret_cast<S*>(smem);  // [rows][kPlainStride]
  S* ks = qs + rows * kPlainStride;    // [kTileKeys][kPlainStride]
  auto* scratch = reinterpret_cast<S*>(smem + p.layout.off_scratch + warp * p.layout.scratch_bytes);

  init_rows<Key>(p, smem, warp);

  const auto* q = static_cast<const Raw*>(p.query);
  const int ntiles = (p.n_keys + kTileKeys - 1) / kTileKeys;
  for (int x = 0; x < 2; ++x) {
    const auto* kx =
        static_cast<const Raw*>(p.keys) + (static_cast<int64_t>(h) * 2 + x) * p.n_keys * p.half;
    for (int tile = 0; tile < ntiles; ++tile) {
      const int n0 = tile * kTileKeys;
      S acc[kRowsPerWarp][2];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) acc[r][0] = acc[r][1] = S(0);
      for (int d0 = 0; d0 < p.half; d0 += kPlainChunk) {
        __syncthreads();  // every warp is done with the previous chunk
        for (int e = tid; e < rows * kPlainChunk; e += nthreads) {
          const int r = e / kPlainChunk, d = e % kPlainChunk;
          const int64_t t = t0 + r;
          S v = S(0);
          if (t < p.tokens && d0 + d < p.half)
            v = to_score<In>(q[t * p.q_stride_t + static_cast<int64_t>(h) * p.q_stride_h +
                               static_cast<int64_t>(x * p.half + d0 + d) * p.q_stride_d]);
          qs[r * kPlainStride + d] = v;
        }
        for (int e = tid; e < kTileKeys * kPlainChunk; e += nthreads) {
          const int r = e / kPlainChunk, d = e % kPlainChunk;
          S v = S(0);
          if (n0 + r < p.n_keys && d0 + d < p.half)
            v = to_score<In>(kx[static_cast<int64_t>(n0 + r) * p.half + d0 + d]);
          ks[r * kPlainStride + d] = v;
        }
        __syncthreads();
        const int dims = p.half - d0 < kPlainChunk ? p.half - d0 : kPlainChunk;
        const S* qw = qs + warp * kRowsPerWarp * kPlainStride;
        for (int d = 0; d < dims; ++d) {
          const S k0 = ks[lane * kPlainStride + d], k1 = ks[(lane + kWarpSize) * kPlainStride + d];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            const S qv = qw[r * kPlainStride + d];
            acc[r][0] = madd(qv, k0, acc[r][0]);
            acc[r][1] = madd(qv, k1, acc[r][1]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        scratch[r * kScratchStride + lane] = acc[r][0];
        scratch[r * kScratchStride + lane + kWarpSize] = acc[r][1];
      }
      __syncwarp();
      select_tile<Key>(p, smem, scratch, warp, x, n0, t0);
    }
    finish_rows<Key>(p, smem, warp, x, t0);
  }

  __syncthreads();  // the chunk buffers become the pair table
  build_pair_table(p, smem, tid, nthreads);
  combine_rows<Key>(p, smem, warp, h, t0);
}

// ---------------------------------------------------------------------------------------
// The kernels: block (x, y) = (token block, head); the launcher sizes the dynamic shared
// memory with make_layout.

namespace {

template <class In, int kHk>
__global__ void __launch_bounds__(kMaxWarps* kWarpSize) pk_topk_mma_kernel(const Params p) {
  MEMORY_EXT_DYNAMIC_SMEM(smem);
  mma_block<In, kHk>(p, static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y),
                     static_cast<int>(threadIdx.x), smem);
}

template <class In>
__global__ void __launch_bounds__(kMaxWarps* kWarpSize) pk_topk_plain_kernel(const Params p) {
  MEMORY_EXT_DYNAMIC_SMEM(smem);
  plain_block<In>(p, static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y),
                  static_cast<int>(threadIdx.x), smem);
}

}  // namespace
}  // namespace memory_ext::cuda::pk

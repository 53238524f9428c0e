// Pieces of the fused product-key top-k that are plain arithmetic: tile constants, the
// ordered keys the selection sorts, the shared-memory layout and the launch parameters.
// Everything here compiles as host C++ too (MEMORY_EXT_HD), so the launcher, the kernel and
// the CPU emulation of the kernel (tests/pk_topk_emulate.cpp) use one definition of each.
#pragma once

#include <cstdint>

#include "memory_ext/host_device.h"

namespace memory_ext::cuda::pk {

constexpr int kRowsPerWarp = 16;               // one mma M tile: each warp owns 16 tokens
constexpr int kTileKeys = 64;                  // sub-keys scored per tile (BK)
constexpr int kScratchStride = kTileKeys + 8;  // 72 = 8 mod 32 words: conflict-free float2 stores
// Tensor-core path: a pipelined sub-key chunk is 64 keys x 128 bytes (64 bf16/fp16 dims or
// 32 fp32 dims: 4 mma k-steps either way); rows are padded to 36 words = 4 mod 32, so the
// fragment loads (8 key rows x 4 words per k-step) hit 32 distinct banks.
constexpr int kMmaChunkBytes = 128;
constexpr int kMmaRowWords = kMmaChunkBytes / 4 + 4;
constexpr int kStages = 3;                     // cp.async pipeline depth
constexpr int kPlainChunk = 32;                // half-dims per chunk (plain FMA path)
constexpr int kPlainStride = kPlainChunk + 1;  // odd stride: lanes read distinct banks
constexpr int kBufCap = 64;  // candidate buffer per row; flushed when it cannot take 32 more
constexpr int kMaxWarps = 8;

// ---------------------------------------------------------------------------------------
// Ordered keys. A (score, index) entry becomes one integer-like key whose unsigned order
// is the result order: higher score first, then lower index. Sorting and merging then
// need a single comparison, and the order is total (indices are distinct within a row), so
// the result does not depend on the order in which candidates arrive. -0 is folded into
// +0 (they compare equal as floats); NaN ranks above +inf, as in torch.topk. The all-zero
// key is below every real entry and marks empty slots.

// Monotone map of a float type F onto the unsigned type U of its size.
template <typename F>
struct OrderTraits;
template <>
struct OrderTraits<float> {
  using U = uint32_t;
  static constexpr U kInfinity = 0x7F800000u;
};
template <>
struct OrderTraits<double> {
  using U = uint64_t;
  static constexpr U kInfinity = 0x7FF0000000000000ull;
};

template <typename F>
MEMORY_EXT_HD typename OrderTraits<F>::U order_bits(F s) {
  using U = typename OrderTraits<F>::U;
  constexpr U sign = U(1) << (8 * sizeof(U) - 1);
  U u = bit_cast<U>(s);
  if ((u & ~sign) > OrderTraits<F>::kInfinity) {
    u = ~sign;  // every NaN is the largest NaN
  } else if (u == sign) {
    u = 0u;  // -0 is +0
  }
  return (u & sign) ? ~u : (u | sign);
}

template <typename F>
MEMORY_EXT_HD F order_bits_to(typename OrderTraits<F>::U o) {
  using U = typename OrderTraits<F>::U;
  constexpr U sign = U(1) << (8 * sizeof(U) - 1);
  return bit_cast<F>((o & sign) ? (o & ~sign) : ~o);
}

// float scores: 32 order bits, then the inverted 32-bit index.
struct KeyF {
  using Score = float;
  uint64_t v;

  MEMORY_EXT_HD static KeyF sentinel() { return KeyF{0}; }
  MEMORY_EXT_HD static KeyF make(float s, uint32_t index) {
    return KeyF{(static_cast<uint64_t>(order_bits(s)) << 32) | (0xFFFFFFFFu - index)};
  }
  MEMORY_EXT_HD float score() const { return order_bits_to<float>(static_cast<uint32_t>(v >> 32)); }
  MEMORY_EXT_HD uint32_t index() const { return 0xFFFFFFFFu - static_cast<uint32_t>(v); }
  MEMORY_EXT_HD bool empty() const { return v == 0; }
  MEMORY_EXT_HD bool operator>(const KeyF& o) const { return v > o.v; }
};

// double scores: 64 order bits, then the inverted index.
struct alignas(16) KeyD {
  using Score = double;
  uint64_t s;
  uint32_t inv;
  uint32_t pad;

  MEMORY_EXT_HD static KeyD sentinel() { return KeyD{0, 0, 0}; }
  MEMORY_EXT_HD static KeyD make(double score, uint32_t index) {
    return KeyD{order_bits(score), 0xFFFFFFFFu - index, 0};
  }
  MEMORY_EXT_HD double score() const { return order_bits_to<double>(s); }
  MEMORY_EXT_HD uint32_t index() const { return 0xFFFFFFFFu - inv; }
  MEMORY_EXT_HD bool empty() const { return s == 0 && inv == 0; }
  MEMORY_EXT_HD bool operator>(const KeyD& o) const { return s > o.s || (s == o.s && inv > o.inv); }
};

template <typename S>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = KeyF;
};
template <>
struct KeyOf<double> {
  using type = KeyD;
};

// ---------------------------------------------------------------------------------------
// Sizes.

MEMORY_EXT_HD int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Pairs (a, b) of half ranks with (a + 1) * (b + 1) <= k: the only ones that can reach the
// top k of the sum, because a pair at ranks (a, b) is beaten by every pair above-left of
// it in the sorted grid.
MEMORY_EXT_HD int pair_count(int k) {
  int n = 0;
  for (int a = 1; a <= k; ++a) n += k / a;
  return n;
}

MEMORY_EXT_HD int align16(int x) { return (x + 15) & ~15; }

// Shared memory of one CTA (16 * nwarps tokens of one head), in bytes:
//   [stage]   sub-key chunks in flight (tensor-core path) or the query and sub-key chunk
//             (plain path); after the scan it holds the pair table of the combine step;
//   [scratch] per warp: its 16 x 64 tile of scores, later its combine list and buffer;
//   [state]   per token: sorted top list of each half (kp keys each) + candidate buffer;
//   [count]   per token: candidates waiting in its buffer;
//   [query]   per token, tensor-core path with the query streamed from shared memory only:
//             the current half as mma operand words (query_row_words each).
struct SmemLayout {
  int scratch_bytes;  // per warp
  int row_bytes;      // per token
  int off_scratch;
  int off_state;
  int off_count;
  int off_query;
  int query_row_words;  // 0: the query half lives in registers (or the plain path runs)
  int total;
};

// Words per token of the streamed query half: whole sub-key chunks (zero-padded), plus 4
// words so that rows are 4 words apart mod 32 and A fragment loads, like the B loads, hit
// 32 distinct banks.
MEMORY_EXT_HD int streamed_query_row_words(int half, int elem_bytes) {
  const int chunk_dims = kMmaChunkBytes / elem_bytes;
  return (half + chunk_dims - 1) / chunk_dims * (kMmaChunkBytes / 4) + 4;
}

MEMORY_EXT_HD SmemLayout make_layout(bool tensor_cores, int score_bytes, int key_bytes, int nwarps,
                                     int kp, int k, int npairs, int query_row_words = 0) {
  SmemLayout l{};
  const int rows = nwarps * kRowsPerWarp;
  const int stage = tensor_cores ? kStages * kTileKeys * kMmaRowWords * 4
                                 : (rows + kTileKeys) * kPlainStride * score_bytes;
  const int table = (npairs + k + 1) * 4;
  const int stage_region = align16(stage > table ? stage : table);
  const int tile = kRowsPerWarp * kScratchStride * score_bytes;
  const int combine = (kp + kBufCap) * key_bytes;
  l.scratch_bytes = align16(tile > combine ? tile : combine);
  l.row_bytes = (2 * kp + kBufCap) * key_bytes;
  l.off_scratch = stage_region;
  l.off_state = l.off_scratch + nwarps * l.scratch_bytes;
  l.off_count = l.off_state + align16(rows * l.row_bytes);
  l.off_query = l.off_count + align16(rows * 4);
  l.query_row_words = query_row_words;
  l.total = l.off_query + rows * query_row_words * 4;
  return l;
}

// ---------------------------------------------------------------------------------------
// Launch parameters (passed by value to the kernel).

struct Params {
  const void* query;  // (tokens, heads, 2 * half), any strides (elements)
  int64_t q_stride_t, q_stride_h, q_stride_d;
  const void* keys;  // (heads, 2, n_keys, half), contiguous
  void* scores;      // (tokens, heads, k) float32 / float64
  int64_t* indices;  // (tokens, heads, k)
  int64_t tokens;
  int heads, n_keys, half, k, kp, npairs, nwarps;
  int vector_keys;  // sub-key rows are 16-byte aligned: cp.async 16-byte copies
  SmemLayout layout;
};

// ---------------------------------------------------------------------------------------
// Launch decisions (host).

enum class InputKind { kBF16, kF16, kF32, kF64 };

// How the half-scores are computed: bf16/fp16 on tensor cores (mma.m16n8k16), fp32 rounded
// to TF32 on tensor cores (mma.m16n8k8), or exact FMAs in the score type.
enum class ScorePath { kPlain, kMma16, kTf32 };

// The largest query half row the tensor-core kernels stream from shared memory (64 KiB per
// warp): half <= 2048 bf16/fp16 dims, half <= 1024 fp32 dims. Wider halves, or k too large
// for the shared memory left, take the plain path.
constexpr int kMaxStreamedQueryBytes = 4096;

// fp32 follows torch's rule for float32 matmuls: TF32 only where the caller allows it
// (torch.get_float32_matmul_precision() != "highest"); otherwise the exact FMA path.
inline ScorePath choose_score_path(InputKind in, int64_t half, int cc_major, bool allow_tf32) {
  switch (in) {
    case InputKind::kBF16:
    case InputKind::kF16:
      return cc_major >= 8 && half * 2 <= kMaxStreamedQueryBytes ? ScorePath::kMma16
                                                                 : ScorePath::kPlain;
    case InputKind::kF32:
      return allow_tf32 && cc_major >= 8 && half * 4 <= kMaxStreamedQueryBytes ? ScorePath::kTf32
                                                                               : ScorePath::kPlain;
    default:
      return ScorePath::kPlain;
  }
}

// Input dims one mma k-step consumes: 8 32-bit words of each row either way.
inline int mma_step_dims(ScorePath path) { return path == ScorePath::kTf32 ? 8 : 16; }

// kHk of a tensor-core kernel that streams its query half from shared memory.
constexpr int kStreamedQuery = 0;

// k-steps of query a tensor-core kernel keeps in registers (its kHk): 16 k-steps of 4 words
// (half <= 256 bf16/fp16 dims, <= 128 fp32 dims); wider halves are streamed from shared
// memory chunk by chunk (kStreamedQuery), which costs one more shared-memory load per four
// B loads. 32 k-steps held in registers spilled inside the tile loop (ptxas, sm_80 and
// sm_90: 384-392 bytes per thread for bf16/fp16, 24-40 for TF32); 16 do not.
inline int query_mma_steps(ScorePath path, int64_t half) {
  return half <= 16 * mma_step_dims(path) ? 16 : kStreamedQuery;
}

// Warps per CTA (16 tokens each), from blocks_per_sm[i], the CTAs of 2^i warps one SM holds
// (0: that size does not fit). More tokens per CTA means fewer sub-key reads from L2, but
// each token needs (2 kp + 64) keys of shared memory; the choice maximises the warps kept
// busy on the whole GPU (residency capped by the number of CTAs there are), preferring
// smaller CTAs on ties. forced (1, 2, 4 or 8) wins where it fits. 0: no size fits.
inline int choose_warps(const int (&blocks_per_sm)[4], int sms, int64_t tokens, int64_t heads,
                        int forced) {
  static_assert(kMaxWarps == 8, "blocks_per_sm has one entry per size 1, 2, 4, 8");
  int best = 0;
  int64_t best_busy = -1;
  for (int i = 0, nw = 1; nw <= kMaxWarps; ++i, nw *= 2) {
    if (blocks_per_sm[i] == 0) continue;
    if (forced == nw) return nw;
    const int64_t ctas = (tokens + nw * kRowsPerWarp - 1) / (nw * kRowsPerWarp) * heads;
    const int64_t resident = static_cast<int64_t>(blocks_per_sm[i]) * sms;
    const int64_t busy = (resident < ctas ? resident : ctas) * nw;
    if (busy > best_busy) {
      best_busy = busy;
      best = nw;
    }
  }
  return best;
}

}  // namespace memory_ext::cuda::pk

// Pieces of the fused product-key top-k that are plain arithmetic: tile constants, the
// ordered keys the selection sorts, the shared-memory layout and the launch parameters.
// Everything here compiles as host C++ too, so the launcher, the kernel and the CPU
// emulation of the kernel (tests/pk_topk_emulate.cpp) use one definition of each.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PK_HD __host__ __device__ __forceinline__
#define PK_FN __device__ __forceinline__
#define PK_UNROLL _Pragma("unroll")
#else
#define PK_HD inline
#define PK_FN inline
#define PK_UNROLL
#endif

namespace memory_ext::pk {

constexpr int kWarp = 32;
constexpr int kRowsPerWarp = 16;               // one mma M tile: each warp owns 16 tokens
constexpr int kTileKeys = 64;                  // sub-keys scored per tile (BK)
constexpr int kScratchStride = kTileKeys + 8;  // 72 = 8 mod 32 words: conflict-free float2 stores
constexpr int kMmaChunk = 64;  // half-dims per pipelined sub-key chunk (tensor-core path)
constexpr int kMmaChunkStride = kMmaChunk + 8;  // 36 words = 4 mod 32: conflict-free fragment loads
constexpr int kStages = 3;                      // cp.async pipeline depth
constexpr int kPlainChunk = 32;                 // half-dims per chunk (plain FMA path)
constexpr int kPlainStride = kPlainChunk + 1;   // odd stride: lanes read distinct banks
constexpr int kBufCap = 64;  // candidate buffer per row; flushed when it cannot take 32 more
constexpr int kMaxWarps = 8;

// ---------------------------------------------------------------------------------------
// Bit casts.

PK_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

PK_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

PK_HD uint64_t double_bits(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

PK_HD double bits_double(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// ---------------------------------------------------------------------------------------
// Ordered keys. A (score, index) entry becomes one integer-like key whose unsigned order
// is the result order: higher score first, then lower index. Sorting and merging then
// need a single comparison, and the order is total (indices are distinct within a row), so
// the result does not depend on the order in which candidates arrive. -0 is folded into
// +0 (they compare equal as floats); NaN ranks above +inf, as in torch.topk. The all-zero
// key is below every real entry and marks empty slots.

// Monotone map float -> uint32.
PK_HD uint32_t order_bits(float s) {
  uint32_t u = float_bits(s);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
    u = 0x7FFFFFFFu;
  } else if (u == 0x80000000u) {
    u = 0u;
  }
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

PK_HD float order_bits_to_float(uint32_t o) {
  return bits_float((o & 0x80000000u) ? (o & 0x7FFFFFFFu) : ~o);
}

PK_HD uint64_t order_bits(double s) {
  uint64_t u = double_bits(s);
  constexpr uint64_t sign = 0x8000000000000000ull;
  if ((u & ~sign) > 0x7FF0000000000000ull) {
    u = ~sign;
  } else if (u == sign) {
    u = 0u;
  }
  return (u & sign) ? ~u : (u | sign);
}

PK_HD double order_bits_to_double(uint64_t o) {
  constexpr uint64_t sign = 0x8000000000000000ull;
  return bits_double((o & sign) ? (o & ~sign) : ~o);
}

// float scores: 32 order bits, then the inverted 32-bit index.
struct KeyF {
  using Score = float;
  uint64_t v;

  PK_HD static KeyF sentinel() { return KeyF{0}; }
  PK_HD static KeyF make(float s, uint32_t index) {
    return KeyF{(static_cast<uint64_t>(order_bits(s)) << 32) | (0xFFFFFFFFu - index)};
  }
  PK_HD float score() const { return order_bits_to_float(static_cast<uint32_t>(v >> 32)); }
  PK_HD uint32_t index() const { return 0xFFFFFFFFu - static_cast<uint32_t>(v); }
  PK_HD bool empty() const { return v == 0; }
  PK_HD bool operator>(const KeyF& o) const { return v > o.v; }
};

// double scores: 64 order bits, then the inverted index.
struct alignas(16) KeyD {
  using Score = double;
  uint64_t s;
  uint32_t inv;
  uint32_t pad;

  PK_HD static KeyD sentinel() { return KeyD{0, 0, 0}; }
  PK_HD static KeyD make(double score, uint32_t index) {
    return KeyD{order_bits(score), 0xFFFFFFFFu - index, 0};
  }
  PK_HD double score() const { return order_bits_to_double(s); }
  PK_HD uint32_t index() const { return 0xFFFFFFFFu - inv; }
  PK_HD bool empty() const { return s == 0 && inv == 0; }
  PK_HD bool operator>(const KeyD& o) const { return s > o.s || (s == o.s && inv > o.inv); }
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

PK_HD int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Pairs (a, b) of half ranks with (a + 1) * (b + 1) <= k: the only ones that can reach the
// top k of the sum, because a pair at ranks (a, b) is beaten by every pair above-left of
// it in the sorted grid.
PK_HD int pair_count(int k) {
  int n = 0;
  for (int a = 1; a <= k; ++a) n += k / a;
  return n;
}

PK_HD int align16(int x) { return (x + 15) & ~15; }

// Shared memory of one CTA (16 * nwarps tokens of one head), in bytes:
//   [stage]   sub-key chunks in flight (tensor-core path) or the query and sub-key chunk
//             (plain path); after the scan it holds the pair table of the combine step;
//   [scratch] per warp: its 16 x 64 tile of scores, later its combine list and buffer;
//   [state]   per token: sorted top list of each half (kp keys each) + candidate buffer;
//   [count]   per token: candidates waiting in its buffer.
struct SmemLayout {
  int scratch_bytes;  // per warp
  int row_bytes;      // per token
  int off_scratch;
  int off_state;
  int off_count;
  int total;
};

PK_HD SmemLayout make_layout(bool tensor_cores, int score_bytes, int key_bytes, int nwarps, int kp,
                             int k, int npairs) {
  SmemLayout l{};
  const int rows = nwarps * kRowsPerWarp;
  const int stage = tensor_cores ? kStages * kTileKeys * kMmaChunkStride * 2
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
  l.total = l.off_count + align16(rows * 4);
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

}  // namespace memory_ext::pk

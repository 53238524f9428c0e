// Small exact top-k helpers for the CPU product-key search. Order: higher score first,
// then lower index, so results are fully determined even with ties. NaN ranks above
// every number, as in torch.topk.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "row_math.h"

namespace memory_ext::cpu {

template <typename S>
struct Scored {
  S score;
  int64_t index;
};

// A functor, not a function pointer, so the sort algorithms inline it. NaN first.
struct RanksBefore {
  template <typename S>
  bool operator()(const Scored<S>& a, const Scored<S>& b) const {
    const bool an = std::isnan(a.score), bn = std::isnan(b.score);
    if (an || bn) return an && (!bn || a.index < b.index);
    return a.score > b.score || (a.score == b.score && a.index < b.index);
  }
};

// Orders the best min(k, count) of cand[0..count) first, best first; returns how many.
template <typename S>
inline int64_t keep_best(Scored<S>* cand, int64_t count, int64_t k) {
  const int64_t kept = std::min(k, count);
  if (count > kept) std::nth_element(cand, cand + (kept - 1), cand + count, RanksBefore{});
  std::sort(cand, cand + kept, RanksBefore{});
  return kept;
}

// ---------------------------------------------------------------------------------------
// float scores with 32-bit indices pack into one uint64 whose unsigned order is the rank
// order: the score's bits made monotone in the high word (NaN made the largest, -0 made
// +0 so that it ties with +0 as floats do), the complemented index in the low word. Sorting
// these is a plain integer sort: no branches on the comparison, half the bytes moved.

inline uint64_t pack_score(float score, uint32_t index) {
  uint32_t bits;
  if (std::isnan(score)) score = std::numeric_limits<float>::quiet_NaN();
  if (score == 0.0f) score = 0.0f;
  std::memcpy(&bits, &score, sizeof bits);
  const uint32_t mono = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (uint64_t(mono) << 32) | uint32_t(~index);
}

inline float packed_score(uint64_t key) {
  const uint32_t mono = uint32_t(key >> 32);
  const uint32_t bits = (mono & 0x80000000u) ? (mono & 0x7fffffffu) : ~mono;
  float score;
  std::memcpy(&score, &bits, sizeof score);
  return score;
}

inline uint32_t packed_index(uint64_t key) { return ~uint32_t(key); }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// Sorts keys[0..count), count <= 8R, descending with a bitonic network over R registers of 8
// keys (padded with 0, which no packed score takes: it would be a NaN's, and NaNs are packed
// as one positive NaN). Branch-free: a sort of the ~1.3 k survivors of a row's filter, or of
// the pair candidates, spent most of its time in mispredicted branches of std::nth_element
// and std::sort (a fifth of pk_topk's time at k 32). Step (size, s) compares entries i and
// i + s (i & s == 0); where i & size == 0 the larger goes first, else the smaller, so each
// size-block ends sorted in alternating order and the last (size 8R) descending.
//
// The merge-masked forms of the intrinsics, with every lane set: GCC 12's unmasked ones pass
// _mm512_undefined_epi32() through, which its -Wuninitialized reports (a false positive).
#define MEMORY_EXT_ALL8 __mmask8(0xff)
template <int R>
__attribute__((target("avx512f"))) void bitonic_sort_desc(uint64_t* keys, int64_t count) {
  __m512i v[R];
  for (int r = 0; r < R; ++r) {
    const int64_t left = std::clamp<int64_t>(count - 8 * r, 0, 8);
    v[r] = _mm512_maskz_loadu_epi64(__mmask8((1u << left) - 1), keys + 8 * r);
  }
  // lanes l ^ s, and the lanes with l & s == 0, for s = 1, 2, 4
  const __m512i partner[3] = {_mm512_set_epi64(6, 7, 4, 5, 2, 3, 0, 1),
                              _mm512_set_epi64(5, 4, 7, 6, 1, 0, 3, 2),
                              _mm512_set_epi64(3, 2, 1, 0, 7, 6, 5, 4)};
  constexpr unsigned kLower[3] = {0x55, 0x33, 0x0f};
  for (int size = 2; size <= 8 * R; size *= 2) {
    for (int s = size / 2; s >= 8; s /= 2) {  // between registers r and r + s / 8
      for (int r = 0; r < R; ++r) {
        const int o = r + s / 8;
        if ((r & (s / 8)) != 0) continue;
        const __m512i lo = _mm512_mask_min_epu64(v[r], MEMORY_EXT_ALL8, v[r], v[o]);
        const __m512i hi = _mm512_mask_max_epu64(v[r], MEMORY_EXT_ALL8, v[r], v[o]);
        const bool desc = ((8 * r) & size) == 0;
        v[r] = desc ? hi : lo;
        v[o] = desc ? lo : hi;
      }
    }
    for (int bit = size >= 8 ? 2 : size == 4 ? 1 : 0; bit >= 0; --bit) {  // within registers
      for (int r = 0; r < R; ++r) {
        // lanes whose block (size) goes descending
        const unsigned desc = size == 2 ? 0x33u : size == 4 ? 0x0fu : ((8 * r) & size) ? 0u : 0xffu;
        const __mmask8 take_max = __mmask8(~(kLower[bit] ^ desc));
        const __m512i other =
            _mm512_mask_permutexvar_epi64(v[r], MEMORY_EXT_ALL8, partner[bit], v[r]);
        v[r] = _mm512_mask_blend_epi64(take_max,
                                       _mm512_mask_min_epu64(v[r], MEMORY_EXT_ALL8, v[r], other),
                                       _mm512_mask_max_epu64(v[r], MEMORY_EXT_ALL8, v[r], other));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t left = std::clamp<int64_t>(count - 8 * r, 0, 8);
    _mm512_mask_storeu_epi64(keys + 8 * r, __mmask8((1u << left) - 1), v[r]);
  }
}
#undef MEMORY_EXT_ALL8

// Sorts keys[0..count) descending where the network takes them (count <= 128 and the CPU
// has AVX-512); returns whether it did.
inline bool sort_small_desc(uint64_t* keys, int64_t count) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (!avx512 || count > 128) return false;
  if (count <= 16)
    bitonic_sort_desc<2>(keys, count);
  else if (count <= 32)
    bitonic_sort_desc<4>(keys, count);
  else if (count <= 64)
    bitonic_sort_desc<8>(keys, count);
  else
    bitonic_sort_desc<16>(keys, count);
  return true;
}
#else
inline bool sort_small_desc(uint64_t*, int64_t) { return false; }
#endif

// Sorts the best min(k, count) keys of keys[0..count) first, best first; returns how many.
inline int64_t keep_best_packed(uint64_t* keys, int64_t count, int64_t k) {
  const int64_t kept = std::min(k, count);
  if (sort_small_desc(keys, count)) return kept;
  if (count > kept)
    std::nth_element(keys, keys + (kept - 1), keys + count, std::greater<uint64_t>());
  std::sort(keys, keys + kept, std::greater<uint64_t>());
  return kept;
}

// A bar for the top k of row[0..n): split the row into G = 4k interleaved groups (entry i
// in group i % G) and take the k-th largest group maximum. There are k distinct entries
// at or above it (their groups' maxima), so the k-th best score is at or above it too,
// and the filter `!(score < bar)` keeps every entry of the top k (NaN included: it fails
// every comparison). Interleaving makes the maxima an element-wise max over consecutive
// chunks, which vectorises. On random data little more than k entries pass. Returns
// -inf when the row is too short for the bar to pay off (everything passes).
template <typename S>
MEMORY_EXT_CLONES S top_bar(const S* __restrict row, int64_t n, int64_t k, std::vector<S>& maxima) {
  const int64_t groups = 4 * k;
  if (n < 2 * groups) return -std::numeric_limits<S>::infinity();
  maxima.assign(groups, -std::numeric_limits<S>::infinity());
  S* __restrict m = maxima.data();
  int64_t c = 0;
  for (; c + groups <= n; c += groups)
    for (int64_t l = 0; l < groups; ++l) m[l] = row[c + l] > m[l] ? row[c + l] : m[l];
  for (int64_t l = 0; c + l < n; ++l) m[l] = row[c + l] > m[l] ? row[c + l] : m[l];
  std::nth_element(maxima.begin(), maxima.begin() + (k - 1), maxima.end(), std::greater<S>());
  return maxima[k - 1];
}

// Top k of row[0..n) (index = position), best first, into buf[0..k); buf holds n entries.
template <typename S>
void select_top(const S* row, int64_t n, int64_t k, Scored<S>* buf, std::vector<S>& maxima) {
  const S bar = top_bar(row, n, k, maxima);
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {  // branch-free append
    buf[kept] = {row[i], i};
    kept += !(row[i] < bar);
  }
  keep_best(buf, kept, k);
}

// Normal quantile z with P(X > z) = tail (0 < tail < 0.5), by bisection: run once per call.
inline float upper_quantile(double tail) {
  double lo = 0.0, hi = 8.0;
  for (int it = 0; it < 40; ++it) {
    const double mid = 0.5 * (lo + hi);
    (0.5 * std::erfc(mid / std::sqrt(2.0)) > tail ? lo : hi) = mid;
  }
  return float(lo);
}

// Mean and standard deviation of row[0..n), in 16 fixed lanes. Written with a 16-float
// vector type: as a loop over lane arrays GCC vectorised it across 16 steps of the row and
// transposed them back (2,600 instructions, a fifth of pk_topk's time).
MEMORY_EXT_CLONES inline void row_moments(const float* __restrict row, int64_t n, float& mean,
                                          float& sd) {
  typedef float lanes16 __attribute__((vector_size(64)));
  lanes16 s = {}, q = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    lanes16 x;
    std::memcpy(&x, row + i, sizeof(x));
    s += x;
    q += x * x;
  }
  float sum = 0.0f, sq = 0.0f;
  for (int l = 0; l < 16; ++l) sum += s[l], sq += q[l];
  for (; i < n; ++i) sum += row[i], sq += row[i] * row[i];
  mean = sum / float(n);
  sd = std::sqrt(std::max(0.0f, sq / float(n) - mean * mean));
}

// Appends the positions i in [begin, n) with !(row[i] < bar) to pos, in order; returns how
// many.
inline int64_t filter_positions_scalar(const float* row, int64_t begin, int64_t n, float bar,
                                       uint64_t* pos) {
  int64_t kept = 0;
  for (int64_t i = begin; i < n; ++i) {  // branch-free append
    pos[kept] = uint64_t(i);
    kept += !(row[i] < bar);
  }
  return kept;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The same with AVX-512: one compare per 16 scores, whose passing positions are packed to
// the front of two vectors of 8 positions (vpcompressq) and stored whole. Branch-free: as
// kept never exceeds the positions scanned, the stores end within the block of 16 being
// scanned, so pos needs no room beyond n. Popping the mask's bits one by one instead
// mispredicted a branch for most blocks of 16 (9% of pk_topk's time at k 32 on a Zen 4).
__attribute__((target("avx512f"))) inline int64_t filter_positions_avx512(const float* row,
                                                                          int64_t n, float bar,
                                                                          uint64_t* pos) {
  const __m512 b = _mm512_set1_ps(bar);
  const __m512i eight = _mm512_set1_epi64(8);
  __m512i lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  int64_t kept = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    // not-less-than, unordered: true for NaN too, as !(x < bar) is
    const uint32_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + i), b, _CMP_NLT_UQ);
    const __mmask8 lo = __mmask8(m), hi = __mmask8(m >> 8);
    _mm512_storeu_si512(pos + kept, _mm512_maskz_compress_epi64(lo, lanes));
    kept += __builtin_popcount(lo);
    lanes = _mm512_add_epi64(lanes, eight);
    _mm512_storeu_si512(pos + kept, _mm512_maskz_compress_epi64(hi, lanes));
    kept += __builtin_popcount(hi);
    lanes = _mm512_add_epi64(lanes, eight);
  }
  return kept + filter_positions_scalar(row, i, n, bar, pos + kept);  // the last n % 16
}
#endif

inline int64_t filter_positions(const float* row, int64_t n, float bar, uint64_t* pos) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return filter_positions_avx512(row, n, bar, pos);
#endif
  return filter_positions_scalar(row, 0, n, bar, pos);
}

// Top k of row[0..n) as packed keys, best first, into buf[0..k); buf holds n entries;
// n <= 2^32. z_guess > 0 tries a cheap bar first: mean + z_guess * sd, a guess of the
// score that about 1.3 k entries of a normal row exceed. Any bar is exact as long as at
// least k entries pass it, so the guess is checked by that count; when it fails (too few
// pass, or too many to be cheap) the group-maxima bar of top_bar is used instead.
inline void select_top_packed(const float* row, int64_t n, int64_t k, float z_guess, uint64_t* buf,
                              std::vector<float>& maxima) {
  int64_t kept = -1;
  if (z_guess > 0.0f) {
    float mean, sd;
    row_moments(row, n, mean, sd);
    kept = filter_positions(row, n, mean + z_guess * sd, buf);
    if (kept < k || kept > 4 * k) kept = -1;
  }
  if (kept < 0) kept = filter_positions(row, n, top_bar(row, n, k, maxima), buf);
  for (int64_t j = 0; j < kept; ++j) buf[j] = pack_score(row[buf[j]], uint32_t(buf[j]));
  keep_best_packed(buf, kept, k);
}

}  // namespace memory_ext::cpu

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

// Sorts the best min(k, count) keys of keys[0..count) first, best first; returns how many.
inline int64_t keep_best_packed(uint64_t* keys, int64_t count, int64_t k) {
  const int64_t kept = std::min(k, count);
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
// The same with AVX-512: one compare per 16 scores, then only the passing positions (a few
// per cent of the row when the bar is good) one by one: 5x fewer instructions than the
// branch-free scalar loop, which was most of pk_topk's selection.
__attribute__((target("avx512f"))) inline int64_t filter_positions_avx512(const float* row,
                                                                          int64_t n, float bar,
                                                                          uint64_t* pos) {
  const __m512 b = _mm512_set1_ps(bar);
  int64_t kept = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    // not-less-than, unordered: true for NaN too, as !(x < bar) is
    uint32_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + i), b, _CMP_NLT_UQ);
    while (m != 0) {
      pos[kept++] = uint64_t(i + __builtin_ctz(m));
      m &= m - 1;
    }
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

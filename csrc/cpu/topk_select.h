// Small exact top-k helpers for the CPU product-key search. Order: higher score first,
// then lower index, so results are fully determined even with ties.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "row_math.h"

namespace memory_ext::cpu {

template <typename S>
struct Scored {
  S score;
  int64_t index;
};

// A functor, not a function pointer, so the sort algorithms inline it.
struct RanksBefore {
  template <typename S>
  bool operator()(const Scored<S>& a, const Scored<S>& b) const {
    return a.score > b.score || (a.score == b.score && a.index < b.index);
  }
};

// Orders the best min(k, count) of cand[0..count) first, best first; returns how many.
template <typename S>
inline int64_t keep_best(Scored<S>* cand, int64_t count, int64_t k) {
  const int64_t kept = std::min(k, count);
  std::partial_sort(cand, cand + kept, cand + count, RanksBefore{});
  return kept;
}

// Top k of row[0..n) (index = position), best first, into buf[0..k); buf holds n entries.
//
// A bar first: split the row into G = 4k interleaved groups (entry i in group i % G) and
// take the k-th largest group maximum. There are k distinct entries at or above it (their
// groups' maxima), so the k-th best score is at or above it too, and the filter
// `score >= bar` keeps every entry of the top k. Interleaving makes the maxima a plain
// element-wise max over consecutive chunks, which vectorises. On random data little more
// than k entries pass, so the exact sort afterwards is tiny.
template <typename S>
MEMORY_EXT_CLONES void select_top(const S* __restrict row, int64_t n, int64_t k,
                                  Scored<S>* __restrict buf, std::vector<S>& maxima) {
  const int64_t groups = 4 * k;
  int64_t kept = 0;
  if (n < 2 * groups) {
    for (int64_t i = 0; i < n; ++i) buf[i] = {row[i], i};
    kept = n;
  } else {
    maxima.assign(row, row + groups);
    S* __restrict m = maxima.data();
    int64_t c = groups;
    for (; c + groups <= n; c += groups)
      for (int64_t l = 0; l < groups; ++l) m[l] = row[c + l] > m[l] ? row[c + l] : m[l];
    for (int64_t l = 0; c + l < n; ++l) m[l] = row[c + l] > m[l] ? row[c + l] : m[l];
    std::nth_element(maxima.begin(), maxima.begin() + (k - 1), maxima.end(), [](S a, S b) { return a > b; });
    const S bar = maxima[k - 1];
    for (int64_t i = 0; i < n; ++i) {  // branch-free append
      buf[kept] = {row[i], i};
      kept += row[i] >= bar;
    }
  }
  keep_best(buf, kept, k);
}

}  // namespace memory_ext::cpu

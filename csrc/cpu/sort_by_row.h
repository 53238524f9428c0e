// Stable grouping of lookup positions by row, the first step of the atomic-free backward.
//
// Each lookup becomes a 64-bit key (row << 32 | position) and an LSD radix sort orders the
// keys on the row bits only (ceil(log2(rows)) bits, in passes of at most 11 bits). A
// stable sort has exactly one result, so the order inside a row's run is the input order
// whatever the number of threads: this is what makes the backward bitwise reproducible.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "memory_ext/checks.h"

namespace memory_ext::cpu {

struct RowRuns {
  std::vector<uint64_t> sorted;    // (row << 32 | position), grouped by row ascending
  std::vector<int64_t> run_begin;  // start of each row's run in `sorted`, plus n at the end
};

inline int bits_for(int64_t rows) {
  int b = 1;
  while (b < 63 && (int64_t(1) << b) < rows) ++b;
  return b;
}

// The keys are cut into fixed chunks, each the work of one task; the result never
// depends on the chunk size (the sort is stable).
struct KeyChunks {
  static constexpr int64_t kChunk = 1 << 15;
  int64_t n;  // keys

  int64_t count() const { return (n + kChunk - 1) / kChunk; }
  int64_t begin(int64_t c) const { return c * kChunk; }
  int64_t end(int64_t c) const { return std::min(n, (c + 1) * kChunk); }

  // f(c) for every chunk c, in parallel.
  template <typename F>
  void each(F&& f) const {
    at::parallel_for(0, count(), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) f(c);
    });
  }
};

// keys[p] = row << 32 | p, after checking that every row is in [0, rows).
template <typename index_t>
void make_row_keys(const index_t* indices, const KeyChunks& chunks, int64_t rows, int64_t bag,
                   const char* op, std::vector<uint64_t>& keys) {
  chunks.each([&](int64_t c) {
    for (int64_t p = chunks.begin(c); p < chunks.end(c); ++p) {
      const int64_t r = indices[p];
      if (C10_UNLIKELY(r < 0 || r >= rows)) fail_index_out_of_range(op, p, bag, r, rows);
      keys[p] = (uint64_t(r) << 32) | uint64_t(p);
    }
  });
}

// One stable counting-sort pass of `from` into `to` on the digit at bit `shift`.
// hist holds one row of counts per chunk.
inline void radix_pass(const KeyChunks& chunks, int shift, int64_t buckets,
                       const std::vector<uint64_t>& from, std::vector<uint64_t>& to,
                       std::vector<int64_t>& hist) {
  const uint64_t mask = uint64_t(buckets - 1);
  std::fill(hist.begin(), hist.end(), 0);
  chunks.each([&](int64_t c) {
    int64_t* h = hist.data() + c * buckets;
    for (int64_t p = chunks.begin(c); p < chunks.end(c); ++p) ++h[(from[p] >> shift) & mask];
  });
  // Exclusive scan in (digit, chunk) order: chunk c's items of digit d follow those of
  // every earlier chunk, which keeps the sort stable.
  int64_t total = 0;
  for (int64_t d = 0; d < buckets; ++d)
    for (int64_t c = 0; c < chunks.count(); ++c) {
      const int64_t count = hist[c * buckets + d];
      hist[c * buckets + d] = total;
      total += count;
    }
  chunks.each([&](int64_t c) {
    int64_t* h = hist.data() + c * buckets;
    for (int64_t p = chunks.begin(c); p < chunks.end(c); ++p)
      to[h[(from[p] >> shift) & mask]++] = from[p];
  });
}

// Stable sort of the keys on their row bits (bits 32 and up, as many as `rows` needs).
inline void sort_keys_by_row(const KeyChunks& chunks, int64_t rows, std::vector<uint64_t>& keys) {
  const int bits = bits_for(rows);
  const int passes = (bits + 10) / 11;
  const int digit_bits = (bits + passes - 1) / passes;
  const int64_t buckets = int64_t(1) << digit_bits;
  std::vector<uint64_t> scratch(keys.size());
  std::vector<int64_t> hist(chunks.count() * buckets);
  for (int pass = 0; pass < passes; ++pass) {
    radix_pass(chunks, 32 + pass * digit_bits, buckets, keys, scratch, hist);
    keys.swap(scratch);
  }
}

// The start of each row's run in sorted keys, then n: a position starts a run where its
// row differs from the previous one.
inline std::vector<int64_t> find_runs(const KeyChunks& chunks, const std::vector<uint64_t>& keys) {
  auto starts_run = [&](int64_t p) { return p == 0 || (keys[p] >> 32) != (keys[p - 1] >> 32); };
  // heads[c + 1]: runs that start in chunks 0..c.
  std::vector<int64_t> heads(chunks.count() + 1, 0);
  chunks.each([&](int64_t c) {
    int64_t count = 0;
    for (int64_t p = chunks.begin(c); p < chunks.end(c); ++p) count += starts_run(p);
    heads[c + 1] = count;
  });
  for (int64_t c = 0; c < chunks.count(); ++c) heads[c + 1] += heads[c];
  std::vector<int64_t> run_begin(heads[chunks.count()] + 1);
  chunks.each([&](int64_t c) {
    int64_t u = heads[c];
    for (int64_t p = chunks.begin(c); p < chunks.end(c); ++p)
      if (starts_run(p)) run_begin[u++] = p;
  });
  run_begin.back() = chunks.n;
  return run_begin;
}

template <typename index_t>
RowRuns sort_by_row(const index_t* indices, int64_t n, int64_t rows, int64_t bag, const char* op) {
  const KeyChunks chunks{n};
  RowRuns out;
  out.sorted.resize(n);
  make_row_keys(indices, chunks, rows, bag, op, out.sorted);
  sort_keys_by_row(chunks, rows, out.sorted);
  out.run_begin = find_runs(chunks, out.sorted);
  return out;
}

}  // namespace memory_ext::cpu

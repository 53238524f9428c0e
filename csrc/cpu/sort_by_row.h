// Stable grouping of lookup positions by row, the first step of the atomic-free backward.
//
// Each lookup becomes a 64-bit key (row << 32 | position) and an LSD radix sort orders the
// keys on the row bits only (ceil(log2(rows)) bits, in passes of at most 11 bits). A
// stable sort has exactly one result, so the order inside a row's run is the input order
// whatever the number of threads: this is what makes the backward bitwise reproducible.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

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

template <typename index_t>
RowRuns sort_by_row(const index_t* indices, int64_t n, int64_t rows, int64_t bag, const char* op) {
  RowRuns out;
  const int64_t chunk = 1 << 15;  // fixed: the result never depends on it (stable sort)
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  std::vector<uint64_t> a(n), b(n);

  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t p = c0 * chunk; p < std::min(n, c1 * chunk); ++p) {
      const int64_t r = indices[p];
      TORCH_CHECK(r >= 0 && r < rows, "memory.", op, ": index out of range: indices[", p / bag,
                  ", ", p % bag, "] = ", r, " but values has ", rows, " rows");
      a[p] = (uint64_t(r) << 32) | uint64_t(p);
    }
  });

  const int bits = bits_for(rows);
  const int passes = (bits + 10) / 11;
  const int digit_bits = (bits + passes - 1) / passes;
  const int64_t buckets = int64_t(1) << digit_bits;
  std::vector<int64_t> hist(n_chunks * buckets);
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = 32 + pass * digit_bits;
    const uint64_t mask = uint64_t(buckets - 1);
    std::fill(hist.begin(), hist.end(), 0);
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* h = hist.data() + c * buckets;
        for (int64_t p = c * chunk; p < std::min(n, (c + 1) * chunk); ++p)
          ++h[(a[p] >> shift) & mask];
      }
    });
    // Exclusive scan in (digit, chunk) order: chunk c's items of digit d follow those of
    // every earlier chunk, which keeps the sort stable.
    int64_t total = 0;
    for (int64_t d = 0; d < buckets; ++d)
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t count = hist[c * buckets + d];
        hist[c * buckets + d] = total;
        total += count;
      }
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* h = hist.data() + c * buckets;
        for (int64_t p = c * chunk; p < std::min(n, (c + 1) * chunk); ++p)
          b[h[(a[p] >> shift) & mask]++] = a[p];
      }
    });
    a.swap(b);
  }

  // Run starts: a position starts a run where its row differs from the previous one.
  std::vector<int64_t> heads(n_chunks + 1, 0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t count = 0;
      for (int64_t p = c * chunk; p < std::min(n, (c + 1) * chunk); ++p)
        count += (p == 0 || (a[p] >> 32) != (a[p - 1] >> 32));
      heads[c + 1] = count;
    }
  });
  for (int64_t c = 0; c < n_chunks; ++c) heads[c + 1] += heads[c];
  out.run_begin.resize(heads[n_chunks] + 1);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t u = heads[c];
      for (int64_t p = c * chunk; p < std::min(n, (c + 1) * chunk); ++p)
        if (p == 0 || (a[p] >> 32) != (a[p - 1] >> 32)) out.run_begin[u++] = p;
    }
  });
  out.run_begin.back() = n;
  out.sorted = std::move(a);
  return out;
}

}  // namespace memory_ext::cpu

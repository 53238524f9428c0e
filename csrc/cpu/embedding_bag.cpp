// CPU kernels of the embedding_bag family: the weighted gather, its atomic-free sparse
// backward, and the dense form of a sparse row gradient.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "huge_pages.h"
#include "memory_ext/checks.h"
#include "row_math.h"
#include "sort_by_row.h"

namespace memory_ext {
namespace {

using cpu::acc_t;
using cpu::as_raw;

// How many lookups ahead the gather prefetches: one group of four rows, the best of 0, 4,
// 8, 12 and 16 measured for 2 KiB rows on our 2-core machine (more evicts rows from L1
// before they are used).
constexpr int64_t kPrefetchDistance = 4;

template <typename index_t>
[[noreturn]] void fail_index(const char* op, index_t v, int64_t rows, int64_t pos, int64_t bag) {
  TORCH_CHECK(false, "memory.", op, ": index out of range: indices[", pos / bag, ", ", pos % bag,
              "] = ", static_cast<int64_t>(v), " but values has ", rows, " rows");
}

template <typename scalar_t, typename weight_t, typename index_t>
void embedding_bag_forward_impl(const at::Tensor& values, const at::Tensor& indices,
                                const at::Tensor& weights, at::Tensor& out) {
  using A = acc_t<scalar_t>;
  const int64_t tokens = indices.size(0), bag = indices.size(1);
  const int64_t rows = values.size(0), dim = values.size(1);
  const auto* V = values.const_data_ptr<scalar_t>();
  const auto* I = indices.const_data_ptr<index_t>();
  const auto* W = weights.const_data_ptr<weight_t>();
  auto* O = out.mutable_data_ptr<scalar_t>();
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
  auto check = [&](int64_t pos) {
    const index_t r = I[pos];
    if (r < 0 || r >= rows) fail_index("embedding_bag", r, rows, pos, bag);
    return static_cast<int64_t>(r);
  };
  // Grain: a few bags per task keeps every thread busy even for small batches.
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    std::vector<A> acc(std::max<int64_t>(dim, 1));
    // Positions are prefetched kPrefetchDistance ahead across bag boundaries, so the
    // first rows of the next bag are already on their way while this one finishes.
    const int64_t end = t1 * bag;
    auto prefetch = [&](int64_t pos) {
      if (pos < end) {
        const int64_t r = I[pos];
        if (r >= 0 && r < rows) cpu::prefetch_row(V + r * dim, row_bytes);
      }
    };
    for (int64_t p = t0 * bag; p < std::min(end, t0 * bag + kPrefetchDistance); ++p) prefetch(p);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t base = t * bag;
      int64_t j = 0;
      for (; j + 4 <= bag; j += 4) {
        const int64_t p = base + j;
        for (int q = 0; q < 4; ++q) prefetch(p + kPrefetchDistance + q);
        const A w[4] = {A(W[p]), A(W[p + 1]), A(W[p + 2]), A(W[p + 3])};
        const auto* r0 = as_raw(V + check(p) * dim);
        const auto* r1 = as_raw(V + check(p + 1) * dim);
        const auto* r2 = as_raw(V + check(p + 2) * dim);
        const auto* r3 = as_raw(V + check(p + 3) * dim);
        if (j == 0)
          cpu::row_axpy4<true>(acc.data(), r0, r1, r2, r3, w, dim);
        else
          cpu::row_axpy4<false>(acc.data(), r0, r1, r2, r3, w, dim);
      }
      for (; j < bag; ++j) {
        const int64_t p = base + j;
        prefetch(p + kPrefetchDistance);
        const auto* r = as_raw(V + check(p) * dim);
        if (j == 0)
          cpu::row_scale(acc.data(), r, A(W[p]), dim);
        else
          cpu::row_axpy(acc.data(), r, A(W[p]), dim);
      }
      if (bag == 0) std::fill(acc.begin(), acc.end(), A(0));
      cpu::row_store(O + t * dim, acc.data(), dim);
    }
  });
}

at::Tensor embedding_bag_cpu(const at::Tensor& values_, const at::Tensor& indices_,
                             const at::Tensor& weights_) {
  check_embedding_bag_args("embedding_bag", values_, indices_, weights_);
  const auto values = values_.contiguous();
  const auto indices = indices_.contiguous();
  const auto weights = weights_.contiguous();
  auto out = cpu::empty_large({indices.size(0), values.size(1)}, values.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, values.scalar_type(), "embedding_bag_cpu", [&] {
        using value_t = scalar_t;
        AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_bag_cpu", [&] {
          if (weights.scalar_type() == values.scalar_type())
            embedding_bag_forward_impl<value_t, value_t, index_t>(values, indices, weights, out);
          else
            embedding_bag_forward_impl<value_t, float, index_t>(values, indices, weights, out);
        });
      });
  return out;
}

// Work unit of the backward: a run of sorted positions that share one row, cut into
// segments of at most kSegment positions so a hot row does not serialise the pass. The
// cut points depend only on the data, so the summation order does too.
constexpr int64_t kSegment = 2048;

struct Segment {
  int64_t run;    // index into the unique rows
  int64_t begin;  // range of sorted positions
  int64_t end;
  int64_t slot;  // -1: the run is one segment, write rows_grad directly; else partial slot
};

template <typename scalar_t, typename weight_t, typename index_t>
void embedding_bag_backward_impl(const at::Tensor& grad_out, const at::Tensor& values,
                                 const at::Tensor& indices, const at::Tensor& weights, bool need_wg,
                                 at::Tensor& rows_out, at::Tensor& rows_grad,
                                 at::Tensor& weights_grad) {
  using A = acc_t<scalar_t>;
  const int64_t bag = indices.size(1);
  const int64_t n = indices.numel();
  const int64_t rows = values.size(0), dim = values.size(1);
  const auto* I = indices.const_data_ptr<index_t>();
  const auto* W = weights.const_data_ptr<weight_t>();
  const auto* V = values.const_data_ptr<scalar_t>();
  const auto* G = grad_out.const_data_ptr<scalar_t>();

  // 1. (row, position) pairs grouped by row, positions ascending inside a group.
  const cpu::RowRuns runs = cpu::sort_by_row(I, n, rows, bag, "embedding_bag_backward");
  const int64_t U = static_cast<int64_t>(runs.run_begin.size()) - 1;

  rows_out = at::empty({U}, indices.options().dtype(at::kLong));
  rows_grad = cpu::empty_large({U, dim}, values.options());
  if (need_wg) weights_grad = cpu::empty_large(indices.sizes(), weights.options());
  auto* R = rows_out.mutable_data_ptr<int64_t>();
  auto* RG = rows_grad.mutable_data_ptr<scalar_t>();
  weight_t* WG = need_wg ? weights_grad.mutable_data_ptr<weight_t>() : nullptr;

  // 2. Segments; long runs get partial-sum slots reduced in order afterwards.
  std::vector<Segment> segs;
  segs.reserve(U + n / kSegment + 1);
  int64_t slots = 0;
  std::vector<int64_t> long_runs;
  for (int64_t u = 0; u < U; ++u) {
    const int64_t b = runs.run_begin[u], e = runs.run_begin[u + 1];
    if (e - b <= kSegment) {
      segs.push_back({u, b, e, -1});
    } else {
      long_runs.push_back(u);
      for (int64_t s = b; s < e; s += kSegment)
        segs.push_back({u, s, std::min(e, s + kSegment), slots++});
    }
  }
  std::vector<A> partial(static_cast<size_t>(slots * dim));
  const uint64_t* sorted = runs.sorted.data();
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(scalar_t));

  // 3. One pass over the segments: sum w * grad_out in position order, four rows at a
  // time, and while the value row is hot in cache, its dot with each grad_out row (the
  // weight gradient). grad_out rows are prefetched a few positions ahead and value rows
  // two segments ahead, across segment boundaries.
  at::parallel_for(0, static_cast<int64_t>(segs.size()), 8, [&](int64_t s0, int64_t s1) {
    std::vector<A> acc(std::max<int64_t>(dim, 1));
    const int64_t end = segs[s1 - 1].end;
    auto grad_row = [&](int64_t p) {
      return G + static_cast<int64_t>(sorted[p] & 0xffffffffu) / bag * dim;
    };
    auto prefetch_values = [&](int64_t s) {
      if (need_wg && s < s1)
        cpu::prefetch_row(V + static_cast<int64_t>(sorted[segs[s].begin] >> 32) * dim, row_bytes);
    };
    prefetch_values(s0);
    prefetch_values(s0 + 1);
    for (int64_t p = segs[s0].begin; p < std::min(end, segs[s0].begin + kPrefetchDistance); ++p)
      cpu::prefetch_row(grad_row(p), row_bytes);
    for (int64_t s = s0; s < s1; ++s) {
      const Segment sg = segs[s];
      prefetch_values(s + 2);
      const int64_t row = static_cast<int64_t>(sorted[sg.begin] >> 32);
      const auto* vrow = as_raw(V + row * dim);
      A* dst = sg.slot < 0 ? acc.data() : partial.data() + sg.slot * dim;
      int64_t p = sg.begin;
      for (; p + 4 <= sg.end; p += 4) {
        for (int q = 0; q < 4; ++q)
          if (p + kPrefetchDistance + q < end)
            cpu::prefetch_row(grad_row(p + kPrefetchDistance + q), row_bytes);
        int64_t pos[4];
        A w[4];
        for (int q = 0; q < 4; ++q) {
          pos[q] = static_cast<int64_t>(sorted[p + q] & 0xffffffffu);
          w[q] = static_cast<A>(W[pos[q]]);
        }
        const auto* g0 = as_raw(grad_row(p));
        const auto* g1 = as_raw(grad_row(p + 1));
        const auto* g2 = as_raw(grad_row(p + 2));
        const auto* g3 = as_raw(grad_row(p + 3));
        if (p == sg.begin)
          cpu::row_axpy4<true>(dst, g0, g1, g2, g3, w, dim);
        else
          cpu::row_axpy4<false>(dst, g0, g1, g2, g3, w, dim);
        if (need_wg) {
          A dots[4];
          cpu::row_dot4(vrow, g0, g1, g2, g3, dim, dots);
          for (int q = 0; q < 4; ++q) WG[pos[q]] = static_cast<weight_t>(dots[q]);
        }
      }
      for (; p < sg.end; ++p) {
        if (p + kPrefetchDistance < end)
          cpu::prefetch_row(grad_row(p + kPrefetchDistance), row_bytes);
        const int64_t pos = static_cast<int64_t>(sorted[p] & 0xffffffffu);
        const auto* g = as_raw(grad_row(p));
        const A w = static_cast<A>(W[pos]);
        if (p == sg.begin)
          cpu::row_scale(dst, g, w, dim);
        else
          cpu::row_axpy(dst, g, w, dim);
        if (need_wg)
          WG[pos] = static_cast<weight_t>(
              cpu::row_dot<cpu::raw_t<scalar_t>, cpu::raw_t<scalar_t>, A>(vrow, g, dim));
      }
      if (sg.slot < 0) {
        R[sg.run] = row;
        cpu::row_store(RG + sg.run * dim, acc.data(), dim);
      }
    }
  });

  // 4. Long runs: fold their partial sums in segment order.
  if (!long_runs.empty()) {
    std::vector<int64_t> first_slot(long_runs.size());
    for (size_t i = 0, slot = 0; i < long_runs.size(); ++i) {
      first_slot[i] = static_cast<int64_t>(slot);
      const int64_t u = long_runs[i];
      slot += (runs.run_begin[u + 1] - runs.run_begin[u] + kSegment - 1) / kSegment;
    }
    at::parallel_for(0, static_cast<int64_t>(long_runs.size()), 1, [&](int64_t i0, int64_t i1) {
      std::vector<A> acc(std::max<int64_t>(dim, 1));
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t u = long_runs[i];
        const int64_t count = (runs.run_begin[u + 1] - runs.run_begin[u] + kSegment - 1) / kSegment;
        const A* first = partial.data() + first_slot[i] * dim;
        std::copy(first, first + dim, acc.begin());
        for (int64_t c = 1; c < count; ++c) {
          const A* part = first + c * dim;
          for (int64_t d = 0; d < dim; ++d) acc[d] += part[d];
        }
        R[u] = static_cast<int64_t>(sorted[runs.run_begin[u]] >> 32);
        cpu::row_store(RG + u * dim, acc.data(), dim);
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_bag_backward_cpu(
    const at::Tensor& grad_out_, const at::Tensor& values_, const at::Tensor& indices_,
    const at::Tensor& weights_, bool need_weights_grad) {
  check_embedding_bag_args("embedding_bag_backward", values_, indices_, weights_);
  check_grad_out("embedding_bag_backward", grad_out_, values_, indices_);
  TORCH_CHECK(
      indices_.numel() < (int64_t(1) << 32) && values_.size(0) < (int64_t(1) << 32),
      "memory.embedding_bag_backward: more than 2^32 lookups or rows are not supported, got ",
      indices_.numel(), " lookups and ", values_.size(0), " rows");
  const auto values = values_.contiguous();
  const auto indices = indices_.contiguous();
  const auto weights = weights_.contiguous();
  const auto grad_out = grad_out_.to(values.scalar_type()).contiguous();
  at::Tensor rows, rows_grad;
  at::Tensor weights_grad = need_weights_grad ? at::empty(indices.sizes(), weights.options())
                                              : at::empty({0}, weights.options());
  if (indices.numel() == 0) {
    rows = at::empty({0}, indices.options().dtype(at::kLong));
    rows_grad = at::empty({0, values.size(1)}, values.options());
    return {rows, rows_grad, weights_grad};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, values.scalar_type(), "embedding_bag_backward_cpu", [&] {
        using value_t = scalar_t;
        AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_bag_backward_cpu", [&] {
          if (weights.scalar_type() == values.scalar_type())
            embedding_bag_backward_impl<value_t, value_t, index_t>(grad_out, values, indices,
                                                                   weights, need_weights_grad, rows,
                                                                   rows_grad, weights_grad);
          else
            embedding_bag_backward_impl<value_t, float, index_t>(grad_out, values, indices, weights,
                                                                 need_weights_grad, rows, rows_grad,
                                                                 weights_grad);
        });
      });
  return {rows, rows_grad, weights_grad};
}

at::Tensor rows_to_dense_cpu(const at::Tensor& rows_, const at::Tensor& rows_grad_,
                             int64_t n_rows) {
  check_rows_to_dense_args(rows_, rows_grad_, n_rows);
  const auto rows = rows_.contiguous();
  const auto rows_grad = rows_grad_.contiguous();
  const int64_t U = rows.size(0), dim = rows_grad.size(1);
  const auto* R = rows.const_data_ptr<int64_t>();
  for (int64_t u = 0; u < U; ++u) {
    TORCH_CHECK(R[u] >= 0 && R[u] < n_rows, "memory.rows_to_dense: rows[", u, "] = ", R[u],
                " is out of range for n_rows = ", n_rows);
    TORCH_CHECK(u == 0 || R[u] > R[u - 1],
                "memory.rows_to_dense: rows must be strictly ascending, "
                "but rows[",
                u - 1, "] = ", R[u - 1], " and rows[", u, "] = ", R[u]);
  }
  auto out = cpu::empty_large({n_rows, dim}, rows_grad.options());
  if (out.numel() == 0) return out;
  const int64_t row_bytes = dim * rows_grad.element_size();
  const auto* src = static_cast<const char*>(rows_grad.const_data_ptr());
  auto* dst = static_cast<char*>(out.mutable_data_ptr());
  // Each output row is written once: a copy of its gradient or zeros.
  at::parallel_for(0, n_rows, 1024, [&](int64_t r0, int64_t r1) {
    int64_t u = std::lower_bound(R, R + U, r0) - R;
    for (int64_t r = r0; r < r1; ++r) {
      if (u < U && R[u] == r) {
        std::memcpy(dst + r * row_bytes, src + u * row_bytes, row_bytes);
        ++u;
      } else {
        std::memset(dst + r * row_bytes, 0, row_bytes);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(memory, CPU, m) {
  m.impl("embedding_bag", &embedding_bag_cpu);
  m.impl("embedding_bag_backward", &embedding_bag_backward_cpu);
  m.impl("rows_to_dense", &rows_to_dense_cpu);
}

}  // namespace memory_ext

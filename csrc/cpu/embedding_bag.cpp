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
#include "memory_ext/prologues.h"
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
    if (r < 0 || r >= rows) fail_index_out_of_range("embedding_bag", pos, bag, r, rows);
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
  int64_t partial_slot;  // -1: the run is one segment, written to rows_grad directly
};

// The segments of every run. A run of more than one segment sums into partial rows, one
// slot per segment, folded in segment order afterwards.
struct SegmentPlan {
  std::vector<Segment> segments;
  std::vector<int64_t> long_runs;        // runs of more than one segment, ascending
  std::vector<int64_t> long_first_slot;  // first partial slot of each long run
  int64_t n_slots = 0;

  int64_t segments_of(const cpu::RowRuns& runs, int64_t run) const {
    return ceil_div(runs.run_begin[run + 1] - runs.run_begin[run], kSegment);
  }
};

SegmentPlan plan_segments(const cpu::RowRuns& runs, int64_t n_lookups) {
  const int64_t n_runs = static_cast<int64_t>(runs.run_begin.size()) - 1;
  SegmentPlan plan;
  plan.segments.reserve(n_runs + n_lookups / kSegment + 1);
  for (int64_t u = 0; u < n_runs; ++u) {
    const int64_t begin = runs.run_begin[u], end = runs.run_begin[u + 1];
    if (end - begin <= kSegment) {
      plan.segments.push_back({u, begin, end, -1});
      continue;
    }
    plan.long_runs.push_back(u);
    plan.long_first_slot.push_back(plan.n_slots);
    for (int64_t s = begin; s < end; s += kSegment)
      plan.segments.push_back({u, s, std::min(end, s + kSegment), plan.n_slots++});
  }
  return plan;
}

// The sorted keys of cpu::sort_by_row: row << 32 | flat position.
inline int64_t key_row(uint64_t key) { return static_cast<int64_t>(key >> 32); }
inline int64_t key_position(uint64_t key) { return static_cast<int64_t>(key & 0xffffffffu); }

// The inputs and outputs of one backward call, as raw pointers.
template <typename scalar_t, typename weight_t>
struct BackwardData {
  const uint64_t* sorted;  // the sorted keys
  const scalar_t* values;
  const scalar_t* grad_out;
  const weight_t* weights;
  weight_t* weights_grad;  // null when the weight gradient is not needed
  int64_t* rows_out;
  scalar_t* rows_grad;
  int64_t bag, dim;

  const scalar_t* grad_row(int64_t sorted_pos) const {
    return grad_out + key_position(sorted[sorted_pos]) / bag * dim;
  }
  int64_t row_bytes() const { return dim * static_cast<int64_t>(sizeof(scalar_t)); }
};

// dst = sum of w * grad_out over the segment's positions in order, four rows at a time,
// and, while the value row is hot in cache, its dot with each grad_out row (the weight
// gradient of that position). grad_out rows are prefetched kPrefetchDistance positions
// ahead, across segment boundaries up to prefetch_end.
template <typename scalar_t, typename weight_t>
void sum_segment(const BackwardData<scalar_t, weight_t>& d, const Segment& seg,
                 int64_t prefetch_end, acc_t<scalar_t>* dst) {
  using A = acc_t<scalar_t>;
  const int64_t dim = d.dim, row_bytes = d.row_bytes();
  const auto* value_row = as_raw(d.values + key_row(d.sorted[seg.begin]) * dim);
  auto prefetch_grad = [&](int64_t p) {
    if (p < prefetch_end) cpu::prefetch_row(d.grad_row(p), row_bytes);
  };
  int64_t p = seg.begin;
  for (; p + 4 <= seg.end; p += 4) {
    for (int q = 0; q < 4; ++q) prefetch_grad(p + kPrefetchDistance + q);
    int64_t pos[4];
    A w[4];
    for (int q = 0; q < 4; ++q) {
      pos[q] = key_position(d.sorted[p + q]);
      w[q] = static_cast<A>(d.weights[pos[q]]);
    }
    const auto* g0 = as_raw(d.grad_row(p));
    const auto* g1 = as_raw(d.grad_row(p + 1));
    const auto* g2 = as_raw(d.grad_row(p + 2));
    const auto* g3 = as_raw(d.grad_row(p + 3));
    if (p == seg.begin)
      cpu::row_axpy4<true>(dst, g0, g1, g2, g3, w, dim);
    else
      cpu::row_axpy4<false>(dst, g0, g1, g2, g3, w, dim);
    if (d.weights_grad != nullptr) {
      A dots[4];
      cpu::row_dot4(value_row, g0, g1, g2, g3, dim, dots);
      for (int q = 0; q < 4; ++q) d.weights_grad[pos[q]] = static_cast<weight_t>(dots[q]);
    }
  }
  for (; p < seg.end; ++p) {
    prefetch_grad(p + kPrefetchDistance);
    const int64_t pos = key_position(d.sorted[p]);
    const auto* g = as_raw(d.grad_row(p));
    const A w = static_cast<A>(d.weights[pos]);
    if (p == seg.begin)
      cpu::row_scale(dst, g, w, dim);
    else
      cpu::row_axpy(dst, g, w, dim);
    if (d.weights_grad != nullptr)
      d.weights_grad[pos] = static_cast<weight_t>(
          cpu::row_dot<cpu::raw_t<scalar_t>, cpu::raw_t<scalar_t>, A>(value_row, g, dim));
  }
}

// One pass over all segments: runs of one segment are written to rows_grad, longer runs
// into their partial slots. Value rows are prefetched two segments ahead.
template <typename scalar_t, typename weight_t>
void sum_segments(const BackwardData<scalar_t, weight_t>& d, const SegmentPlan& plan,
                  acc_t<scalar_t>* partial) {
  using A = acc_t<scalar_t>;
  const std::vector<Segment>& segs = plan.segments;
  const int64_t dim = d.dim, row_bytes = d.row_bytes();
  at::parallel_for(0, static_cast<int64_t>(segs.size()), 8, [&](int64_t s0, int64_t s1) {
    std::vector<A> acc(std::max<int64_t>(dim, 1));
    const int64_t prefetch_end = segs[s1 - 1].end;
    auto prefetch_values = [&](int64_t s) {
      if (d.weights_grad != nullptr && s < s1)
        cpu::prefetch_row(d.values + key_row(d.sorted[segs[s].begin]) * dim, row_bytes);
    };
    prefetch_values(s0);
    prefetch_values(s0 + 1);
    for (int64_t p = segs[s0].begin; p < std::min(prefetch_end, segs[s0].begin + kPrefetchDistance);
         ++p)
      cpu::prefetch_row(d.grad_row(p), row_bytes);
    for (int64_t s = s0; s < s1; ++s) {
      const Segment seg = segs[s];
      prefetch_values(s + 2);
      const bool whole_run = seg.partial_slot < 0;
      sum_segment(d, seg, prefetch_end, whole_run ? acc.data() : partial + seg.partial_slot * dim);
      if (whole_run) {
        d.rows_out[seg.run] = key_row(d.sorted[seg.begin]);
        cpu::row_store(d.rows_grad + seg.run * dim, acc.data(), dim);
      }
    }
  });
}

// Long runs: rows_grad = their partial rows summed in segment order.
template <typename scalar_t, typename weight_t>
void fold_long_runs(const BackwardData<scalar_t, weight_t>& d, const cpu::RowRuns& runs,
                    const SegmentPlan& plan, const acc_t<scalar_t>* partial) {
  using A = acc_t<scalar_t>;
  const int64_t dim = d.dim;
  const int64_t n_long = static_cast<int64_t>(plan.long_runs.size());
  at::parallel_for(0, n_long, 1, [&](int64_t i0, int64_t i1) {
    std::vector<A> acc(std::max<int64_t>(dim, 1));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t u = plan.long_runs[i];
      const int64_t n_parts = plan.segments_of(runs, u);
      const A* first = partial + plan.long_first_slot[i] * dim;
      std::copy(first, first + dim, acc.begin());
      for (int64_t c = 1; c < n_parts; ++c) {
        const A* part = first + c * dim;
        for (int64_t e = 0; e < dim; ++e) acc[e] += part[e];
      }
      d.rows_out[u] = key_row(d.sorted[runs.run_begin[u]]);
      cpu::row_store(d.rows_grad + u * dim, acc.data(), dim);
    }
  });
}

// Sort the lookups by row (stable), plan the segments, sum them, fold the long runs.
template <typename scalar_t, typename weight_t, typename index_t>
void embedding_bag_backward_impl(const EmbeddingBagBackwardInputs& in, at::Tensor& rows_out,
                                 at::Tensor& rows_grad, at::Tensor& weights_grad) {
  const int64_t n_lookups = in.indices.numel(), bag = in.indices.size(1);
  const int64_t n_rows = in.values.size(0), dim = in.values.size(1);
  const cpu::RowRuns runs = cpu::sort_by_row(in.indices.const_data_ptr<index_t>(), n_lookups,
                                             n_rows, bag, "embedding_bag_backward");
  const int64_t n_unique = static_cast<int64_t>(runs.run_begin.size()) - 1;

  rows_out = at::empty({n_unique}, in.indices.options().dtype(at::kLong));
  rows_grad = cpu::empty_large({n_unique, dim}, in.values.options());
  if (in.need_weights_grad)
    weights_grad = cpu::empty_large(in.indices.sizes(), in.weights.options());
  const BackwardData<scalar_t, weight_t> d{
      runs.sorted.data(),
      in.values.const_data_ptr<scalar_t>(),
      in.grad_out.const_data_ptr<scalar_t>(),
      in.weights.const_data_ptr<weight_t>(),
      in.need_weights_grad ? weights_grad.mutable_data_ptr<weight_t>() : nullptr,
      rows_out.mutable_data_ptr<int64_t>(),
      rows_grad.mutable_data_ptr<scalar_t>(),
      bag,
      dim};

  const SegmentPlan plan = plan_segments(runs, n_lookups);
  std::vector<acc_t<scalar_t>> partial(static_cast<size_t>(plan.n_slots * dim));
  sum_segments(d, plan, partial.data());
  if (!plan.long_runs.empty()) fold_long_runs(d, runs, plan, partial.data());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_bag_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& weights, bool need_weights_grad) {
  check_embedding_bag_backward_args(grad_out, values, indices, weights);
  const EmbeddingBagBackwardInputs in =
      embedding_bag_backward_inputs(grad_out, values, indices, weights, need_weights_grad);
  if (in.no_lookups()) return in.no_lookups_result();
  at::Tensor rows, rows_grad, weights_grad = in.weights_grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, in.values.scalar_type(), "embedding_bag_backward_cpu", [&] {
        using value_t = scalar_t;
        AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), "embedding_bag_backward_cpu", [&] {
          if (in.weights.scalar_type() == in.values.scalar_type())
            embedding_bag_backward_impl<value_t, value_t, index_t>(in, rows, rows_grad,
                                                                   weights_grad);
          else
            embedding_bag_backward_impl<value_t, float, index_t>(in, rows, rows_grad, weights_grad);
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
  check_sparse_rows(kRowsToDenseRows, R, U, n_rows);
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

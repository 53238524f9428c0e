// CPU kernels of the embedding_bag family: the weighted gather, its atomic-free sparse
// backward, and the dense form of a sparse row gradient.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "embedding_bag_cpu.h"
#include "large_buffers.h"
#include "memory_ext/checks.h"
#include "memory_ext/prologues.h"
#include "row_dispatch.h"
#include "sort_by_row.h"

namespace memory_ext {
namespace {

using cpu::acc_t;
using cpu::as_raw;

// The gather has two strategies, picked by the row's shape (measured on a 2-core Xeon,
// tables of 2^20 rows on huge pages, tokens 4096, bag 128, against each other):
// - rows of 16, 32 or 64 elements, and rows of up to kRegisterRowBytes whose length is a
//   multiple of kRegisterChunk: one row at a time, the bag's running sums for a chunk of
//   the row in registers, each row prefetched kAheadLookups lookups before it is added
//   (dim 128: bf16 1.45x, fp32 1.15x; bf16 dims 256 and 512: 1.5x and 1.25x faster than
//   rows side by side);
// - other rows: kRowsInFlight rows side by side (cpu::row_axpy_n), the rows of the next
//   block prefetched (fp32 dim 1024: 1.25x faster than chunks in registers, which read each
//   row once per chunk; at 2 KiB rows the two are within 5%).
constexpr int kRegisterChunk = 128;
constexpr int64_t kRegisterRowBytes = 1024;
constexpr int kRowsInFlight = 16;
constexpr int64_t kPrefetchDistance = kRowsInFlight;
constexpr int64_t kAheadLookups = 16;

// The backward's grad_out rows (a tokens x dim block, mostly in cache) four at a time,
// prefetched four positions ahead.
constexpr int kGradRowsInFlight = 4;
constexpr int64_t kGradPrefetchDistance = 4;
// With the weight gradient, the sorted pass also reads each run's value row (ascending
// rows), prefetched this many segments ahead (4, 8 and 16 measured alike).
constexpr int64_t kValuePrefetchSegments = 8;

// The forward's inputs as raw pointers, and the index check every lookup goes through.
template <typename scalar_t, typename weight_t, typename index_t>
struct ForwardData {
  const scalar_t* values;
  const index_t* indices;
  const weight_t* weights;
  scalar_t* out;
  int64_t rows, dim, bag;

  // The row of lookup pos, after checking its index.
  const cpu::raw_t<scalar_t>* row(int64_t pos) const {
    const index_t r = indices[pos];
    if (r < 0 || r >= rows) fail_index_out_of_range("embedding_bag", pos, bag, r, rows);
    return as_raw(values + static_cast<int64_t>(r) * dim);
  }
  // The row of lookup pos for a prefetch: null past end or for a bad index (which the
  // lookup itself reports).
  const cpu::raw_t<scalar_t>* row_or_null(int64_t pos, int64_t end) const {
    if (pos >= end) return nullptr;
    const index_t r = indices[pos];
    return r < 0 || r >= rows ? nullptr : as_raw(values + static_cast<int64_t>(r) * dim);
  }
  int64_t row_bytes() const { return dim * static_cast<int64_t>(sizeof(scalar_t)); }
};

// Bags of rows of exactly C elements, summed in registers (see the strategies above).
template <int C, typename scalar_t, typename weight_t, typename index_t>
void forward_in_registers(const ForwardData<scalar_t, weight_t, index_t>& d, int64_t tokens) {
  using A = acc_t<scalar_t>;
  using R = cpu::raw_t<scalar_t>;
  const int64_t bag = d.bag;
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    std::vector<const R*> rows(bag), ahead(bag);
    std::vector<A> w(bag);
    std::vector<A> acc(d.dim);
    const int64_t end = t1 * bag;
    for (int64_t p = t0 * bag; p < std::min(end, t0 * bag + kAheadLookups); ++p)
      if (const R* r = d.row_or_null(p, end))
        cpu::prefetch_row<cpu::PrefetchTo::L2>(r, d.row_bytes());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t base = t * bag;
      for (int64_t j = 0; j < bag; ++j) {
        rows[j] = d.row(base + j);
        w[j] = A(d.weights[base + j]);
        ahead[j] = d.row_or_null(base + j + kAheadLookups, end);
      }
      if (bag == 0) std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t c = 0; bag > 0 && c < d.dim; c += C)
        cpu::bag_sum<C>(acc.data() + c, rows.data(), w.data(), ahead.data(), C * sizeof(R), bag, c);
      cpu::row_store(d.out + t * d.dim, acc.data(), d.dim);
    }
  });
}

// Bags of rows of any length, kRowsInFlight rows side by side (see the strategies above).
template <typename scalar_t, typename weight_t, typename index_t>
void forward_rows_in_flight(const ForwardData<scalar_t, weight_t, index_t>& d, int64_t tokens) {
  using A = acc_t<scalar_t>;
  using R = cpu::raw_t<scalar_t>;
  const int64_t bag = d.bag, dim = d.dim;
  // Grain: a few bags per task keeps every thread busy even for small batches.
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    std::vector<A> acc(std::max<int64_t>(dim, 1));
    // Positions are prefetched kPrefetchDistance ahead across bag boundaries, so the
    // first rows of the next bag are already on their way while this one finishes.
    const int64_t end = t1 * bag;
    auto prefetch = [&](int64_t pos) {
      if (const R* r = d.row_or_null(pos, end))
        cpu::prefetch_row<cpu::PrefetchTo::L2>(r, d.row_bytes());
    };
    for (int64_t p = t0 * bag; p < std::min(end, t0 * bag + kPrefetchDistance); ++p) prefetch(p);
    // acc (+)= the weighted rows of positions p .. p + N - 1.
    auto add_rows = [&](auto n_rows, int64_t p, bool first) {
      constexpr int N = decltype(n_rows)::value;
      const R* r[N];
      A w[N];
      for (int q = 0; q < N; ++q) {
        prefetch(p + kPrefetchDistance + q);
        r[q] = d.row(p + q);
        w[q] = A(d.weights[p + q]);
      }
      if (first)
        cpu::row_axpy_n<N, true>(acc.data(), r, w, dim);
      else
        cpu::row_axpy_n<N, false>(acc.data(), r, w, dim);
    };
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t base = t * bag;
      int64_t j = 0;
      for (; j + kRowsInFlight <= bag; j += kRowsInFlight)
        add_rows(std::integral_constant<int, kRowsInFlight>{}, base + j, j == 0);
      for (; j + 4 <= bag; j += 4) add_rows(std::integral_constant<int, 4>{}, base + j, j == 0);
      for (; j < bag; ++j) add_rows(std::integral_constant<int, 1>{}, base + j, j == 0);
      if (bag == 0) std::fill(acc.begin(), acc.end(), A(0));
      cpu::row_store(d.out + t * dim, acc.data(), dim);
    }
  });
}

template <typename scalar_t, typename weight_t, typename index_t>
void embedding_bag_forward_impl(const at::Tensor& values, const at::Tensor& indices,
                                const at::Tensor& weights, at::Tensor& out) {
  const ForwardData<scalar_t, weight_t, index_t> d{values.const_data_ptr<scalar_t>(),
                                                   indices.const_data_ptr<index_t>(),
                                                   weights.const_data_ptr<weight_t>(),
                                                   out.mutable_data_ptr<scalar_t>(),
                                                   values.size(0),
                                                   values.size(1),
                                                   indices.size(1)};
  const int64_t tokens = indices.size(0);
  switch (d.dim) {
    case 16:
      return forward_in_registers<16>(d, tokens);
    case 32:
      return forward_in_registers<32>(d, tokens);
    case 64:
      return forward_in_registers<64>(d, tokens);
    default:
      if (d.dim % kRegisterChunk == 0 && d.row_bytes() <= kRegisterRowBytes)
        return forward_in_registers<kRegisterChunk>(d, tokens);
      return forward_rows_in_flight(d, tokens);
  }
}

// check_indices is not read: the CPU gather checks every index as it reads it, at no
// synchronisation cost, so an index the caller vouched for is checked all the same.
at::Tensor embedding_bag_cpu(const at::Tensor& values_, const at::Tensor& indices_,
                             const at::Tensor& weights_, bool /*check_indices*/) {
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
  const scalar_t* grad_out;
  const weight_t* weights;
  const scalar_t* values;
  weight_t* weights_grad;   // null when not needed
  scalar_t* rows_grad;      // (runs, dim), or with dense_rows the (rows, dim) table gradient
  const int64_t* run_rows;  // the row of each run (ascending)
  int64_t bag, dim;
  // rows_grad is large (cpu::kPooledBytes or more): written with streaming stores, as it
  // is read next by the optimizer or rows_to_dense from DRAM anyway.
  bool stream_rows_grad;
  // Each run's gradient goes to its row of a dense table gradient instead of its run's
  // slot (embedding_bag_backward_dense: no (runs, dim) buffer to fill and copy out).
  bool dense_rows;

  scalar_t* out_row(int64_t run) const {
    return rows_grad + (dense_rows ? run_rows[run] : run) * dim;
  }
  const scalar_t* grad_row(int64_t sorted_pos) const {
    return grad_out + key_position(sorted[sorted_pos]) / bag * dim;
  }
  const scalar_t* value_row(int64_t run) const { return values + run_rows[run] * dim; }
  // Writes a whole run's summed gradient to its row.
  void store_run(int64_t run, const acc_t<scalar_t>* acc) const {
    if (stream_rows_grad)
      cpu::row_store_streaming(out_row(run), acc, dim);
    else
      cpu::row_store(out_row(run), acc, dim);
  }
  // Prefetches the weight of the lookup at sorted position p, and its weight gradient's
  // line for the write: both are read at random positions of tokens x bag arrays (2 MiB
  // each at 2^19 lookups), and without this the weight's load was a third of the pass's
  // time (prefetched: 9% faster, bf16 and fp32, on a 2-core AMD EPYC).
  void prefetch_weight(int64_t sorted_pos) const {
    const int64_t pos = key_position(sorted[sorted_pos]);
    __builtin_prefetch(weights + pos);
    if (weights_grad != nullptr) __builtin_prefetch(weights_grad + pos, 1);
  }
  int64_t row_bytes() const { return dim * static_cast<int64_t>(sizeof(scalar_t)); }
};

// dst = sum of w * grad_out over the segment's positions in order, four rows at a time;
// with the weight gradient, also each position's <grad_out row, the run's value row>.
// grad_out rows are prefetched kGradPrefetchDistance positions ahead, across segment
// boundaries up to prefetch_end.
template <typename scalar_t, typename weight_t>
void sum_segment(const BackwardData<scalar_t, weight_t>& d, const Segment& seg,
                 int64_t prefetch_end, acc_t<scalar_t>* dst) {
  using A = acc_t<scalar_t>;
  const int64_t dim = d.dim, row_bytes = d.row_bytes();
  auto prefetch_grad = [&](int64_t p) {
    if (p < prefetch_end) {
      cpu::prefetch_row(d.grad_row(p), row_bytes);
      d.prefetch_weight(p);
    }
  };
  int64_t p = seg.begin;
  constexpr int G = kGradRowsInFlight;
  for (; p + G <= seg.end; p += G) {
    int64_t pos[G];
    A w[G];
    const cpu::raw_t<scalar_t>* g[G];
    for (int q = 0; q < G; ++q) {
      prefetch_grad(p + kGradPrefetchDistance + q);
      pos[q] = key_position(d.sorted[p + q]);
      w[q] = static_cast<A>(d.weights[pos[q]]);
      g[q] = as_raw(d.grad_row(p + q));
    }
    if (p == seg.begin)
      cpu::row_axpy_n<G, true>(dst, g, w, dim);
    else
      cpu::row_axpy_n<G, false>(dst, g, w, dim);
  }
  for (; p < seg.end; ++p) {
    prefetch_grad(p + kGradPrefetchDistance);
    const int64_t pos = key_position(d.sorted[p]);
    const auto* g = as_raw(d.grad_row(p));
    const A w = static_cast<A>(d.weights[pos]);
    if (p == seg.begin)
      cpu::row_axpy_n<1, true>(dst, &g, &w, dim);
    else
      cpu::row_axpy_n<1, false>(dst, &g, &w, dim);
  }
  if (d.weights_grad != nullptr) {
    // The weight gradient of each of the segment's lookups, with the segment's value row
    // (read once) and the grad_out rows just summed (in cache).
    const auto* v = as_raw(d.value_row(seg.run));
    for (p = seg.begin; p < seg.end; ++p)
      d.weights_grad[key_position(d.sorted[p])] =
          static_cast<weight_t>(cpu::row_dot<cpu::raw_t<scalar_t>, cpu::raw_t<scalar_t>, A>(
              v, as_raw(d.grad_row(p)), dim));
  }
}

// Runs of exactly M lookups (M = 1 or 2: at 2^19 lookups over 2^20 rows, 61% and 30% of
// the lookups), collected from a task's segments and finished kRunsInFlight at a time by
// cpu::sum_rows_and_dot_n: the same bits as sum_segment gives each run, with that many
// rows' misses in flight instead of one row's. (Backward at that shape, dim 512, call by
// call against every run one at a time on a 2-core AMD EPYC: bf16 82 -> 45 ms, fp32 88 ->
// 58 ms.) Longer runs, and a task's last few short ones, go one at a time.
template <int M, typename scalar_t, typename weight_t>
class ShortRuns {
 public:
  static_assert(M < kGradRowsInFlight, "sum_segment adds such runs one row at a time");

  ShortRuns(const BackwardData<scalar_t, weight_t>& d, acc_t<scalar_t>* acc) : d_(d), acc_(acc) {}

  // Whether the batched kernel takes this call's rows: float accumulation, whole 64-byte
  // lines of output per row, and a 16-byte aligned gradient for the streaming stores.
  static bool usable(const BackwardData<scalar_t, weight_t>& d) {
    return std::is_same_v<acc_t<scalar_t>, float> && d.dim % cpu::kLineElements<scalar_t> == 0 &&
           reinterpret_cast<uintptr_t>(d.rows_grad) % 16 == 0;
  }

  // Queues a segment that is a whole run of M lookups; finishes the batch when it is full.
  // Its rows and weights are prefetched now, about a batch before they are read (the rows
  // into L2: 6% faster than into L1 or not at all).
  void add(const Segment& seg) {
    for (int k = 0; k < M; ++k) {
      d_.prefetch_weight(seg.begin + k);
      cpu::prefetch_row<cpu::PrefetchTo::L2>(d_.grad_row(seg.begin + k), d_.row_bytes());
    }
    if (d_.weights_grad != nullptr)
      cpu::prefetch_row<cpu::PrefetchTo::L2>(d_.value_row(seg.run), d_.row_bytes());
    queued_[count_] = seg;
    if (++count_ == kRunsInFlight) finish();
  }

  // Finishes the queued runs (a task's last ones, fewer than a batch, one at a time).
  void finish() {
    if constexpr (!std::is_same_v<acc_t<scalar_t>, float>) {
      count_ = 0;  // never queued: usable() is false
    } else {
      if (count_ == kRunsInFlight) {
        if (d_.stream_rows_grad)
          finish_batch<true>();
        else
          finish_batch<false>();
      } else {
        for (int q = 0; q < count_; ++q) finish_one(queued_[q]);
      }
      count_ = 0;
    }
  }

 private:
  static constexpr int kRunsInFlight = 8;
  using R = cpu::raw_t<scalar_t>;

  template <bool kStream>
  void finish_batch() {
    constexpr int N = kRunsInFlight;
    scalar_t* out[N];
    const R* g[N * M];
    const R* v[N];
    float w[N * M], dots[N * M];
    int64_t pos[N * M];
    for (int q = 0; q < N; ++q) {
      out[q] = d_.out_row(queued_[q].run);
      v[q] = as_raw(d_.value_row(queued_[q].run));
      for (int k = 0; k < M; ++k) {
        const int64_t p = queued_[q].begin + k;
        pos[q * M + k] = key_position(d_.sorted[p]);
        g[q * M + k] = as_raw(d_.grad_row(p));
        w[q * M + k] = static_cast<float>(d_.weights[pos[q * M + k]]);
      }
    }
    if (d_.weights_grad == nullptr) {
      cpu::sum_rows_and_dot_n<N, M, kStream, false>(out, g, w, v, dots, d_.dim);
      return;
    }
    cpu::sum_rows_and_dot_n<N, M, kStream, true>(out, g, w, v, dots, d_.dim);
    for (int j = 0; j < N * M; ++j) d_.weights_grad[pos[j]] = static_cast<weight_t>(dots[j]);
  }

  // One run as sum_segments does it.
  void finish_one(const Segment& seg) {
    sum_segment(d_, seg, seg.end, acc_);
    d_.store_run(seg.run, acc_);
  }

  const BackwardData<scalar_t, weight_t>& d_;
  acc_t<scalar_t>* acc_;  // the task's row of sums (dim), for runs finished one at a time
  int count_ = 0;
  Segment queued_[kRunsInFlight];
};

// One pass over all segments: runs of one segment are written to rows_grad, longer runs
// into their partial slots.
template <typename scalar_t, typename weight_t>
void sum_segments(const BackwardData<scalar_t, weight_t>& d, const SegmentPlan& plan,
                  acc_t<scalar_t>* partial) {
  using A = acc_t<scalar_t>;
  const std::vector<Segment>& segs = plan.segments;
  const int64_t dim = d.dim, row_bytes = d.row_bytes();
  const bool batch_short_runs = ShortRuns<1, scalar_t, weight_t>::usable(d);
  at::parallel_for(0, static_cast<int64_t>(segs.size()), 8, [&](int64_t s0, int64_t s1) {
    std::vector<A> acc(std::max<int64_t>(dim, 1));
    ShortRuns<1, scalar_t, weight_t> singles(d, acc.data());
    ShortRuns<2, scalar_t, weight_t> pairs(d, acc.data());
    const int64_t prefetch_end = segs[s1 - 1].end;
    for (int64_t p = segs[s0].begin;
         p < std::min(prefetch_end, segs[s0].begin + kGradPrefetchDistance); ++p)
      cpu::prefetch_row(d.grad_row(p), row_bytes);
    for (int64_t s = s0; d.weights_grad != nullptr && s < std::min(s1, s0 + kValuePrefetchSegments);
         ++s)
      cpu::prefetch_row<cpu::PrefetchTo::L2>(d.value_row(segs[s].run), row_bytes);
    for (int64_t s = s0; s < s1; ++s) {
      if (d.weights_grad != nullptr && s + kValuePrefetchSegments < s1)
        cpu::prefetch_row<cpu::PrefetchTo::L2>(d.value_row(segs[s + kValuePrefetchSegments].run),
                                               row_bytes);
      const Segment seg = segs[s];
      const bool whole_run = seg.partial_slot < 0;
      if (batch_short_runs && whole_run && seg.end - seg.begin <= 2) {
        if (seg.end - seg.begin == 1)
          singles.add(seg);
        else
          pairs.add(seg);
        continue;
      }
      sum_segment(d, seg, prefetch_end, whole_run ? acc.data() : partial + seg.partial_slot * dim);
      if (whole_run) d.store_run(seg.run, acc.data());
    }
    singles.finish();
    pairs.finish();
    if (d.stream_rows_grad) cpu::stream_fence();
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
      cpu::row_store(d.out_row(u), acc.data(), dim);
    }
  });
}

// Zeros in every row of a dense (n_rows, dim) table that is not among `rows` (ascending):
// with the touched rows written by the backward, each row of the table is written once.
template <typename scalar_t>
void zero_untouched_rows(scalar_t* table, const int64_t* rows, int64_t n_unique, int64_t n_rows,
                         int64_t dim) {
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
  at::parallel_for(0, n_rows, 1024, [&](int64_t r0, int64_t r1) {
    int64_t u = std::lower_bound(rows, rows + n_unique, r0) - rows;
    for (int64_t r = r0; r < r1;) {
      const int64_t gap_end = u < n_unique ? std::min(rows[u], r1) : r1;
      if (gap_end > r) std::memset(table + r * dim, 0, (gap_end - r) * row_bytes);
      r = gap_end + 1;  // past the touched row (or r1)
      ++u;
    }
  });
}

// Sort the lookups by row (stable), plan the segments, sum them (and take the weight
// gradient's dots in the same pass), fold the long runs. dense: rows_grad is the (rows, dim)
// table gradient.
template <typename scalar_t, typename weight_t, typename index_t>
void embedding_bag_backward_impl(const EmbeddingBagBackwardInputs& in, at::Tensor& rows_out,
                                 at::Tensor& rows_grad, at::Tensor& weights_grad, const char* op,
                                 bool dense) {
  const int64_t n_lookups = in.indices.numel(), bag = in.indices.size(1);
  const int64_t n_rows = in.values.size(0), dim = in.values.size(1);
  const cpu::RowRuns runs =
      cpu::sort_by_row(in.indices.const_data_ptr<index_t>(), n_lookups, n_rows, bag, op);
  const int64_t n_unique = static_cast<int64_t>(runs.run_begin.size()) - 1;

  rows_out = at::empty({n_unique}, in.indices.options().dtype(at::kLong));
  rows_grad = cpu::empty_large({dense ? n_rows : n_unique, dim}, in.values.options());
  if (in.need_weights_grad)
    weights_grad = cpu::empty_large(in.indices.sizes(), in.weights.options());
  // The unique rows, once, before the sums (the dense form writes each run at its row).
  int64_t* R = rows_out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, n_unique, 4096, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) R[u] = key_row(runs.sorted[runs.run_begin[u]]);
  });
  const BackwardData<scalar_t, weight_t> d{
      runs.sorted.data(),
      in.grad_out.const_data_ptr<scalar_t>(),
      in.weights.const_data_ptr<weight_t>(),
      in.values.const_data_ptr<scalar_t>(),
      in.need_weights_grad ? weights_grad.mutable_data_ptr<weight_t>() : nullptr,
      rows_grad.mutable_data_ptr<scalar_t>(),
      R,
      bag,
      dim,
      static_cast<int64_t>(rows_grad.nbytes()) >= cpu::kPooledBytes,
      dense};
  // The untouched rows first, in table order: the table's pages are then first touched in
  // order, before the row gradients land on them (measured faster than after).
  if (dense) zero_untouched_rows(rows_grad.mutable_data_ptr<scalar_t>(), R, n_unique, n_rows, dim);
  const SegmentPlan plan = plan_segments(runs, n_lookups);
  std::vector<acc_t<scalar_t>> partial(static_cast<size_t>(plan.n_slots * dim));
  sum_segments(d, plan, partial.data());
  if (!plan.long_runs.empty()) fold_long_runs(d, runs, plan, partial.data());
}

// The backward of both ops; dense: rows_grad is the (rows, dim) table gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& weights, bool need_weights_grad, const char* op, bool dense) {
  check_embedding_bag_backward_args(grad_out, values, indices, weights, op);
  const EmbeddingBagBackwardInputs in =
      embedding_bag_backward_inputs(grad_out, values, indices, weights, need_weights_grad);
  if (in.no_lookups()) {
    auto [rows, rows_grad, weights_grad] = in.no_lookups_result();
    return {rows, dense ? at::zeros(in.values.sizes(), in.values.options()) : rows_grad,
            weights_grad};
  }
  at::Tensor rows, rows_grad, weights_grad = in.weights_grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, in.values.scalar_type(), "embedding_bag_backward_cpu", [&] {
        using value_t = scalar_t;
        AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), "embedding_bag_backward_cpu", [&] {
          if (in.weights.scalar_type() == in.values.scalar_type())
            embedding_bag_backward_impl<value_t, value_t, index_t>(in, rows, rows_grad,
                                                                   weights_grad, op, dense);
          else
            embedding_bag_backward_impl<value_t, float, index_t>(in, rows, rows_grad, weights_grad,
                                                                 op, dense);
        });
      });
  return {rows, rows_grad, weights_grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_bag_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& weights, bool need_weights_grad) {
  return backward(grad_out, values, indices, weights, need_weights_grad, "embedding_bag_backward",
                  false);
}

// check_rows is not read: checking rows here costs no synchronisation.
at::Tensor rows_to_dense_cpu(const at::Tensor& rows_, const at::Tensor& rows_grad_, int64_t n_rows,
                             bool /*check_rows*/) {
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

// The backward writing each touched row's gradient straight into the dense table (the
// other rows zeroed): the same bits as rows_to_dense of embedding_bag_backward, without
// the (touched rows, dim) buffer written and copied out. check_indices is not read: the
// CPU kernel checks either way.
std::tuple<at::Tensor, at::Tensor> embedding_bag_backward_dense_cpu(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& weights, bool need_weights_grad, bool /*check_indices*/) {
  auto [rows, grad_values, weights_grad] = backward(
      grad_out, values, indices, weights, need_weights_grad, "embedding_bag_backward_dense", true);
  return {grad_values, weights_grad};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu::sparse_backward(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& weights, bool need_weights_grad, const char* op) {
  return backward(grad_out, values, indices, weights, need_weights_grad, op, false);
}

TORCH_LIBRARY_IMPL(memory, CPU, m) {
  m.impl("embedding_bag", &embedding_bag_cpu);
  m.impl("embedding_bag_backward", &embedding_bag_backward_cpu);
  m.impl("embedding_bag_backward_dense", &embedding_bag_backward_dense_cpu);
  m.impl("rows_to_dense", &rows_to_dense_cpu);
}

}  // namespace memory_ext

// CPU emulation of the CUDA kernels of the embedding_bag family, for machines without a
// GPU. The kernel headers (csrc/cuda/embedding_bag_forward_kernel.cuh,
// embedding_bag_backward_kernel.cuh, embedding_bag_sort_kernels.cuh,
// rows_to_dense_kernel.cuh) are compiled unchanged as host C++ against the CUDA emulation
// of tests/cuda_emulate.h (one host thread per CUDA thread). Launches use grids of one to
// three blocks, so the grid-stride loops run several rounds. Each launch takes the vector
// width the launchers take (widest_vector): dims that are not a whole number of 16-byte
// vectors and buffers placed 2, 4 or 8 bytes past alignment (views with a storage offset)
// reach every width of the step-down, and a section fails if one is never reached; every
// vector access checks its alignment (tests/cuda_emulate.h). The CUB sort and scans
// between the small kernels of the backward are replaced by a stable sort and plain
// prefix sums. Inputs are small multiples of 1/4, so every float32 sum is exact in any
// order: results must equal a double-precision reference exactly (after the one rounding
// to the output dtype), and outputs start poisoned (NaN, -1), so an element a kernel fails
// to write is a mismatch.
//
// Build: g++ -std=c++20 -O2 -pthread -fno-strict-aliasing -Icsrc/include -Icsrc/cuda -Itests
//        tests/embedding_bag_emulate.cpp   (see tests/cuda_emulate.h for sanitizers)
// Run:   ./a.out [section]   (exit status 0 when every case matches)
#include "cuda_emulate.h"  // first: the kernels below compile against it

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

// ---------------------------------------------------------------------------------------
// The kernels, unchanged.

#include "embedding_bag_backward_kernel.cuh"
#include "embedding_bag_forward_kernel.cuh"
#include "embedding_bag_sort_kernels.cuh"
#include "memory_ext/launch_rules.h"
#include "rows_to_dense_kernel.cuh"

using namespace memory_ext::cuda;

// ---------------------------------------------------------------------------------------
// Test values and references.

template <typename T>
T from_double(double d);
template <>
float from_double<float>(double d) {
  return static_cast<float>(d);
}
template <>
double from_double<double>(double d) {
  return d;
}
template <>
__nv_bfloat16 from_double<__nv_bfloat16>(double d) {
  return __float2bfloat16_rn(static_cast<float>(d));
}
template <>
__half from_double<__half>(double d) {
  return __float2half_rn(static_cast<float>(d));
}

inline double to_double(float v) { return v; }
inline double to_double(double v) { return v; }
inline double to_double(__nv_bfloat16 v) { return __bfloat162float(v); }
inline double to_double(__half v) { return __half2float(v); }

// The kernel's result for an exact sum: one rounding to T (through float for 16-bit types).
template <typename T>
double rounded(double exact) {
  return to_double(from_double<T>(exact));
}

std::mt19937_64 rng(12345);
double small_value() {
  return static_cast<double>(static_cast<int>(rng() % 17) - 8) / 4;
}  // k/4, |k| <= 8

// Same number (NaN, the poison, equals nothing).
inline bool same(double a, double b) { return a == b; }

// Byte offsets of the buffers of a case from 16-byte alignment (whole elements).
struct Offsets {
  int values = 0, weights = 0, out = 0;  // forward; backward: out is rows_grad
  int grad_out = 0;                      // backward
  std::string name() const {
    std::string s;
    auto add = [&](const char* what, int o) {
      if (o != 0) s += std::string(" ") + what + "+" + std::to_string(o);
    };
    add("values", values);
    add("weights", weights);
    add("out", out);
    add("grad_out", grad_out);
    return s;
  }
};

// The vector widths (elements per access) each section launched, so it can check that
// its grid reached every width of the step-down.
std::vector<int> g_widths;
template <typename T>
void check_widths(const char* what) {
  std::string missing;
  for (int v = kVec16<T>; v >= 1; v /= 2)
    if (std::find(g_widths.begin(), g_widths.end(), v) == g_widths.end())
      missing += " " + std::to_string(v);
  emu::report(missing.empty(),
              std::string(what) + " " + emu::type_name<T>() + " reaches every width",
              "never launched with" + missing);
  g_widths.clear();
}

struct Lookups {
  int64_t tokens, bag, rows;
  std::vector<int64_t> idx;  // flat, may hold bad values
  std::vector<double> w;
  bool ok(int64_t p) const { return idx[p] >= 0 && idx[p] < rows; }
  int64_t first_bad() const {
    for (int64_t p = 0; p < tokens * bag; ++p)
      if (!ok(p)) return p;
    return -1;
  }
};

// n_bad: that many lookups made bad (out of range either side) at random positions, or
// kEveryLookupBad.
constexpr int kEveryLookupBad = -1;

Lookups make_lookups(int64_t tokens, int64_t bag, int64_t rows, double hot, int n_bad) {
  Lookups L{tokens, bag, rows, std::vector<int64_t>(tokens * bag),
            std::vector<double>(tokens * bag)};
  std::uniform_real_distribution<double> u(0, 1);
  for (int64_t p = 0; p < tokens * bag; ++p) {
    L.idx[p] = u(rng) < hot ? 2 % rows : static_cast<int64_t>(rng() % rows);
    L.w[p] = small_value();
  }
  if (n_bad == kEveryLookupBad)
    for (int64_t p = 0; p < tokens * bag; ++p) L.idx[p] = (p % 2) ? -1 : rows;
  for (int i = 0; i < n_bad && tokens * bag > 0; ++i) {
    const int64_t p = static_cast<int64_t>(rng() % (tokens * bag));
    L.idx[p] =
        (i % 2) ? -1 - static_cast<int64_t>(rng() % 5) : rows + static_cast<int64_t>(rng() % 5);
  }
  return L;
}

// ---------------------------------------------------------------------------------------
// Forward.

template <typename T>
void forward_case(int64_t dim, int64_t tokens, int64_t bag, bool idx64, bool w_f32, int n_bad,
                  bool report_bad, int64_t max_blocks = 3, Offsets off = {}) {
  const int64_t rows = 23;
  Lookups L = make_lookups(tokens, bag, rows, 0.0, n_bad);
  emu::OffsetBuffer<T> values(rows * dim, off.values);
  std::vector<double> vd(rows * dim);
  for (int64_t i = 0; i < values.size(); ++i) {
    vd[i] = small_value();
    values[i] = from_double<T>(vd[i]);
  }
  std::vector<int64_t> i64(L.idx);
  std::vector<int32_t> i32(L.idx.begin(), L.idx.end());
  emu::OffsetBuffer<float> wf(L.w.size(), off.weights);
  emu::OffsetBuffer<T> wt(L.w.size(), off.weights);
  for (size_t i = 0; i < L.w.size(); ++i) {
    wf[i] = static_cast<float>(L.w[i]);
    wt[i] = from_double<T>(L.w[i]);
  }
  emu::OffsetBuffer<T> out(tokens * dim, off.out);
  out.poison();
  unsigned long long first_bad = ~0ull;

  ForwardArgs a{};
  a.values = values.data();
  a.indices = idx64 ? static_cast<const void*>(i64.data()) : static_cast<const void*>(i32.data());
  a.weights = w_f32 ? static_cast<const void*>(wf.data()) : static_cast<const void*>(wt.data());
  a.out = out.data();
  a.tokens = tokens;
  a.bag = bag;
  a.rows = rows;
  a.dim = dim;
  a.idx64 = idx64;
  a.w_f32 = w_f32;
  a.first_bad = report_bad ? &first_bad : nullptr;
  std::string shape;
  // The launcher's choice of vector (embedding_bag_forward.cu).
  constexpr int kV = kVec16<T>;
  const int vec = widest_vector(dim, kV, {{a.values, sizeof(T)}, {a.out, sizeof(T)}});
  g_widths.push_back(vec);
  with_vector<kV>(vec, [&]<int VEC>() {
    with_forward_shape<VEC>(dim / VEC, [&]<int G, int VPL>() {
      shape = "G" + std::to_string(G) + "xVPL" + std::to_string(VPL);
      const int64_t items = tokens * ceil_div(dim, int64_t(G) * VPL * VEC);
      const int64_t blocks = std::min<int64_t>(max_blocks, ceil_div(items, kForwardBlock / G));
      emu::launch(static_cast<unsigned>(std::max<int64_t>(blocks, 1)), kForwardBlock,
                  &embedding_bag_kernel<T, VEC, G, VPL>, a);
    });
  });

  std::string bad;
  for (int64_t t = 0; t < tokens && bad.empty(); ++t)
    for (int64_t d = 0; d < dim && bad.empty(); ++d) {
      double exact = 0;
      for (int64_t j = 0; j < bag; ++j) {
        const int64_t p = t * bag + j;
        if (L.ok(p)) exact += L.w[p] * vd[L.idx[p] * dim + d];
      }
      const double got = to_double(out[t * dim + d]);
      if (!same(got, rounded<T>(exact)))
        bad = "out[" + std::to_string(t) + "," + std::to_string(d) + "] = " + std::to_string(got) +
              ", want " + std::to_string(rounded<T>(exact));
    }
  if (report_bad && bad.empty()) {
    const int64_t want = L.first_bad();
    const int64_t got = first_bad == ~0ull ? -1 : static_cast<int64_t>(first_bad);
    if (got != want) bad = "first_bad " + std::to_string(got) + ", want " + std::to_string(want);
  }
  char name[220];
  std::snprintf(
      name, sizeof name, "forward %s vec%d %s dim %lld tokens %lld bag %lld idx%s w%s bad %d%s%s%s",
      emu::type_name<T>(), vec, shape.c_str(), (long long)dim, (long long)tokens, (long long)bag,
      idx64 ? "64" : "32", w_f32 ? "f32" : emu::type_name<T>(), n_bad,
      report_bad ? " reported" : "", max_blocks == 1 ? " one block" : "", off.name().c_str());
  emu::report(bad.empty(), name, bad);
}

// The element offsets of misaligned views: 2, 4 and 8 bytes where T's size divides them.
template <typename T>
std::vector<int> view_offsets() {
  std::vector<int> out;
  for (int o : {2, 4, 8})
    if (o % sizeof(T) == 0) out.push_back(o);
  return out;
}

template <typename T>
void forward_cases() {
  constexpr int V = kVec16<T>;
  int k = 0;
  for (int64_t n : {1, 4, 5, 8, 16, 17, 32, 33, 65, 130})
    for (int64_t bag : {0, 1, 9, 33}) {
      const bool idx64 = (k % 2) == 0, w_f32 = std::is_same_v<T, float> || (k % 3) != 0;
      const int n_bad = (k % 4 == 1) ? 3 : 0;
      // One block in every other case, so the grid-stride loop takes several rounds.
      forward_case<T>(n * V, 5, bag, idx64, w_f32, n_bad, (k % 8) == 1, (k % 2) ? 1 : 3);
      ++k;
    }
  forward_case<T>(V, 150, 3, true, true, 0, false, 1);  // 150 items for 64 groups of 4 lanes
  // Rows that are not a whole number of 16-byte vectors: narrower vectors, down to one
  // element (dims 1, 3, 5, 31, 33).
  for (int64_t dim : {1, 3, 4, 5, 6, 12, 31, 33, 36, 130, 132})
    for (int64_t bag : {1, 33}) {
      forward_case<T>(dim, 4, bag, (k % 2) == 0, true, (k % 3) == 0 ? 2 : 0, (k % 3) == 0);
      ++k;
    }
  // Views with a storage offset: each base in turn, on a short row (sub-warps) and a row
  // of two accesses per lane.
  for (int o : view_offsets<T>())
    for (int64_t n : {4, 33})
      for (int which = 0; which < 3; ++which) {
        Offsets off;
        (which == 0 ? off.values : which == 1 ? off.out : off.weights) = o;
        forward_case<T>(n * V, 5, 9, (k % 2) == 0, (k % 3) != 0, 0, false, 3, off);
        ++k;
      }
  check_widths<T>("forward");
}

// ---------------------------------------------------------------------------------------
// Backward: the small grouping kernels, a stable sort and prefix sums in place of CUB's,
// then the segment kernel and the fold of long runs.

struct Grouped {
  std::vector<uint32_t> keys, positions, run_begin;
  std::vector<RunPlan> plan;
  int64_t info[kInfoSize];
};

template <typename index_t>
Grouped group(const std::vector<index_t>& idx, int64_t rows) {
  const int64_t n = static_cast<int64_t>(idx.size());
  Grouped g;
  std::vector<uint32_t> keys(n), pos(n);
  emu::launch(1, 32, &init_info_kernel, g.info);
  emu::launch(static_cast<unsigned>(std::min<int64_t>(2, ceil_div(n, kSortBlock))), kSortBlock,
              &make_keys_kernel<index_t>, idx.data(), n, rows, keys.data(), pos.data(), g.info);
  // Stable sort by key, as the LSD radix sort does.
  std::vector<int64_t> order(n);
  for (int64_t p = 0; p < n; ++p) order[p] = p;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return keys[x] < keys[y]; });
  g.keys.resize(n);
  g.positions.resize(n);
  for (int64_t p = 0; p < n; ++p) {
    g.keys[p] = keys[order[p]];
    g.positions[p] = pos[order[p]];
  }
  std::vector<uint32_t> heads(n), run_id(n);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(2, ceil_div(n, kSortBlock)));
  emu::launch(grid, kSortBlock, &run_heads_kernel, g.keys.data(), n, heads.data());
  for (int64_t p = 0, s = 0; p < n; ++p) {
    run_id[p] = static_cast<uint32_t>(s);
    s += heads[p];
  }
  g.run_begin.assign(n + 1, 0xdeadbeefu);
  emu::launch(grid, kSortBlock, &run_begin_kernel, heads.data(), run_id.data(), n,
              g.run_begin.data(), g.info);
  std::vector<RunPlan> counts(n + 1, RunPlan{0xdeadbeefu, 0xdeadbeefu, 0xdeadbeefu});
  emu::launch(static_cast<unsigned>(std::min<int64_t>(2, ceil_div(n + 1, kSortBlock))), kSortBlock,
              &run_counts_kernel, g.keys.data(), g.run_begin.data(),
              static_cast<const int64_t*>(g.info), n + 1, rows, counts.data());
  g.plan.resize(n + 1);
  RunPlan acc{0, 0, 0};
  for (int64_t u = 0; u <= n; ++u) {
    g.plan[u] = acc;
    acc = PlanSum{}(acc, counts[u]);
  }
  emu::launch(1, 32, &finish_info_kernel, static_cast<const RunPlan*>(g.plan.data()), n, g.info);
  return g;
}

// What one schedule of the backward writes; starts poisoned (the weight gradient zeroed
// when bad lookups are skipped, as the op does).
template <typename T>
struct BackwardOutputs {
  std::vector<int64_t> rows_out;
  emu::OffsetBuffer<T> rows_grad;
  std::vector<acc_t<T>> partial;
  std::vector<uint32_t> long_runs;
  emu::OffsetBuffer<float> wg_f;
  emu::OffsetBuffer<T> wg_t;
  BackwardOutputs(int64_t n_runs, int64_t dim, int64_t long_slots, int64_t n_long, int64_t n,
                  const Offsets& off, bool zero_wg)
      : rows_out(n_runs),
        rows_grad(n_runs * dim, off.out),
        partial(long_slots * dim),
        long_runs(n_long, 0xdeadbeefu),
        wg_f(n, off.weights),
        wg_t(n, off.weights) {
    emu::poison(rows_out);
    rows_grad.poison();
    emu::poison(partial);
    wg_f.poison();
    wg_t.poison();
    for (int64_t p = 0; zero_wg && p < n; ++p) {
      wg_f[p] = 0.0f;
      wg_t[p] = from_double<T>(0);
    }
  }
};

// What a fixed-size launch (counts left on the device, buffers and grids sized by
// backward_bounds) writes besides its row gradients: partial sums, long runs, and the
// weight gradient, which starts zeroed, as the ops do.
template <typename T>
struct FixedSizeOutputs {
  std::vector<acc_t<T>> partial;
  std::vector<uint32_t> long_runs;
  emu::OffsetBuffer<float> wg_f;
  emu::OffsetBuffer<T> wg_t;
  FixedSizeOutputs(int64_t dim, const BackwardBounds& bound, int64_t n, const Offsets& off)
      : partial(bound.long_slots * dim),
        long_runs(bound.long_runs, 0xdeadbeefu),
        wg_f(n, off.weights),
        wg_t(n, off.weights) {
    emu::poison(partial);
    for (int64_t p = 0; p < n; ++p) {
      wg_f[p] = 0.0f;
      wg_t[p] = from_double<T>(0);
    }
  }
  // a's work buffers and weight gradient pointed at these.
  void point(BackwardArgs& a, bool need_wg, bool w_f32) {
    a.partial = partial.empty() ? nullptr : partial.data();
    a.long_runs = long_runs.empty() ? nullptr : long_runs.data();
    a.weights_grad = !need_wg ? nullptr
                     : w_f32  ? static_cast<void*>(wg_f.data())
                              : static_cast<void*>(wg_t.data());
  }
};

// embedding_bag_backward_dense's launch: row gradients at their rows of a dense table,
// which starts poisoned: rows no lookup touches must stay as they were (the op zeroes them
// first).
template <typename T>
struct StaticOutputs : FixedSizeOutputs<T> {
  emu::OffsetBuffer<T> dense;
  StaticOutputs(int64_t rows, int64_t dim, const BackwardBounds& bound, int64_t n,
                const Offsets& off)
      : FixedSizeOutputs<T>(dim, bound, n, off), dense(rows * dim, off.out) {
    dense.poison();
  }
};

// embedding_bag_backward_padded's launch: row gradients in the runs' slots of a
// (bound.runs, dim) buffer. The rows start as the op's padding (-1) and the row gradients
// poisoned: slots past the exact count must stay as they were (the op zeroes them first).
template <typename T>
struct PaddedOutputs : FixedSizeOutputs<T> {
  std::vector<int64_t> rows_out;
  emu::OffsetBuffer<T> rows_grad;
  PaddedOutputs(int64_t dim, const BackwardBounds& bound, int64_t n, const Offsets& off)
      : FixedSizeOutputs<T>(dim, bound, n, off),
        rows_out(bound.runs, -1),
        rows_grad(bound.runs * dim, off.out) {
    rows_grad.poison();
  }
};

// Static-size launches per section (each case has one), and those whose exact counts pick
// the short-run schedule on the "device".
int g_static_launches = 0, g_static_short_picked = 0;

// Launches of the short-run schedule, and cases where the launcher would pick it, per
// section; a section fails if either is none.
int g_short_launches = 0, g_short_picked = 0;
std::vector<int> g_short_widths;  // the vector widths it ran with

// A random value that is not a short binary fraction, for the cases that compare the two
// schedules bit for bit where float sums round (and so depend on the order).
double rough_value() { return std::uniform_real_distribution<double>(-2, 2)(rng); }

// One backward case. The schedule the launcher picks (use_short_run_backward) runs; when
// that is the short-run schedule, the segment kernel runs too, and both must equal the
// exact reference and each other bit for bit. With exact false the inputs are rough values
// whose sums round: no reference, only the bitwise comparison of the two schedules (the
// short-run schedule must sum in the segment kernel's order).
template <typename T>
void backward_case(int64_t dim, int64_t tokens, int64_t bag, int64_t rows, double hot, bool idx64,
                   bool w_f32, bool need_wg, int n_bad, Offsets off = {}, bool exact = true,
                   int64_t max_blocks = 3) {
  using A = acc_t<T>;
  Lookups L = make_lookups(tokens, bag, rows, hot, n_bad);
  const int64_t n = tokens * bag;
  auto value = [&] { return exact ? small_value() : rough_value(); };
  if (!exact)
    for (double& w : L.w) w = rough_value();
  std::vector<double> vd(rows * dim), gd(tokens * dim);
  emu::OffsetBuffer<T> values(rows * dim, off.values), grad(tokens * dim, off.grad_out);
  for (size_t i = 0; i < vd.size(); ++i) values[i] = from_double<T>(vd[i] = value());
  for (size_t i = 0; i < gd.size(); ++i) grad[i] = from_double<T>(gd[i] = value());
  emu::OffsetBuffer<float> wf(n, off.weights);
  emu::OffsetBuffer<T> wt(n, off.weights);
  for (int64_t p = 0; p < n; ++p) {
    wf[p] = static_cast<float>(L.w[p]);
    wt[p] = from_double<T>(L.w[p]);
  }

  Grouped g =
      idx64 ? group(L.idx, rows) : group(std::vector<int32_t>(L.idx.begin(), L.idx.end()), rows);
  const int64_t first_bad = g.info[kFirstBad];
  const int64_t n_runs = g.info[kRunsWithBad] - (first_bad >= 0 ? 1 : 0);
  auto make_outputs = [&] {
    return BackwardOutputs<T>(n_runs, dim, g.info[kLongSlots], g.info[kLongRuns], n, off,
                              first_bad >= 0);
  };

  BackwardArgs a{};
  a.grad_out = grad.data();
  a.values = values.data();
  a.weights = w_f32 ? static_cast<const void*>(wf.data()) : static_cast<const void*>(wt.data());
  a.keys = g.keys.data();
  a.positions = g.positions.data();
  a.run_begin = g.run_begin.data();
  a.plan = g.plan.data();
  a.bag = bag;
  a.dim = dim;
  a.n_runs = n_runs;
  a.n_segments = g.info[kSegments];
  a.n_long_runs = g.info[kLongRuns];
  a.lookups = n;
  a.w_f32 = w_f32;
  auto point_at = [&](BackwardOutputs<T>& o) {
    a.weights_grad = !need_wg ? nullptr
                     : w_f32  ? static_cast<void*>(o.wg_f.data())
                              : static_cast<void*>(o.wg_t.data());
    a.rows_out = o.rows_out.data();
    a.rows_grad = o.rows_grad.data();
    a.partial = o.partial.empty() ? nullptr : o.partial.data();
    a.long_runs = o.long_runs.empty() ? nullptr : o.long_runs.data();
  };
  BackwardOutputs<T> seg_out = make_outputs(), short_out = make_outputs();
  const BackwardBounds bound = backward_bounds(n, rows);
  StaticOutputs<T> static_out(rows, dim, bound, n, off);
  // The static launch: bounds for the host's counts, the exact ones on the "device".
  BackwardArgs s = a;
  s.n_runs = bound.runs;
  s.n_segments = bound.segments;
  s.n_long_runs = bound.long_runs;
  s.device_counts = g.info;
  s.dense_rows = true;
  s.rows_out = nullptr;
  s.rows_grad = static_out.dense.data();
  static_out.point(s, need_wg, w_f32);
  // The fixed-size sparse launch: the same as the static one, into run slots.
  PaddedOutputs<T> padded_out(dim, bound, n, off);
  BackwardArgs ps = s;
  ps.dense_rows = false;
  ps.rows_out = padded_out.rows_out.data();
  ps.rows_grad = padded_out.rows_grad.data();
  padded_out.point(ps, need_wg, w_f32);
  point_at(seg_out);
  // The launcher's choice of vector (embedding_bag_backward.cu); both output sets have the
  // same alignment.
  constexpr int kV = kVec16<T>;
  const int vec = widest_vector(dim, kV,
                                {{a.values, sizeof(T)},
                                 {a.grad_out, sizeof(T)},
                                 {a.rows_grad, sizeof(T)},
                                 {a.partial, sizeof(A)}});
  // The short-run schedule runs wherever it fits, so every grid reaches it; the launcher
  // takes it only where use_short_run_backward says (counted for the section's check).
  const bool short_runs =
      a.n_segments > 0 && short_run_backward_fits(a.n_runs, a.n_segments, a.n_long_runs, dim / vec);
  if (use_short_run_backward(a.n_runs, a.n_segments, a.n_long_runs, a.lookups, dim / vec))
    ++g_short_picked;
  // The static launch runs both schedules where the short-run one fits the row, as the
  // launcher does; the kernels pick on the "device" counts (counted for the section).
  s.both_schedules = dim / vec <= kShortRunMaxAccesses;
  if (s.both_schedules &&
      use_short_run_backward(a.n_runs, a.n_segments, a.n_long_runs, a.lookups, dim / vec))
    ++g_static_short_picked;
  std::string shape = "none", short_shape;
  // The exact launches run where some lookup is valid (the launcher skips them otherwise);
  // the fixed-size ones wherever the bounds allow a segment, as the ops launch them before
  // anything is counted, so with every lookup bad their groups must all idle.
  if (s.n_segments > 0) {
    g_widths.push_back(vec);
    with_vector<kV>(vec, [&]<int VEC>() {
      with_backward_shape<VEC>(dim / VEC, [&]<int G, int VPT, int R, bool TILED>() {
        shape = "G" + std::to_string(G) + "xVPT" + std::to_string(VPT) + (TILED ? "T" : "");
        constexpr int kBlock = backward_block(G);
        const int64_t blocks = std::min<int64_t>(max_blocks, ceil_div(a.n_segments, kBlock / G));
        if (a.n_segments > 0)
          emu::launch(static_cast<unsigned>(blocks), kBlock,
                      &embedding_bag_backward_kernel<T, VEC, G, VPT, R, TILED>, a);
        // The static launch's grid covers the bounds (one block more than the exact
        // launch where the bounds allow, so groups past the counts exist and must idle).
        const int64_t static_blocks =
            std::min<int64_t>(max_blocks + 1, ceil_div(s.n_segments, kBlock / G));
        for (const BackwardArgs* x : {&s, &ps})
          emu::launch(static_cast<unsigned>(static_blocks), kBlock,
                      &embedding_bag_backward_kernel<T, VEC, G, VPT, R, TILED>, *x);
        ++g_static_launches;
      });
      if (s.both_schedules)
        with_short_run_shape<VEC>(dim / VEC, [&]<int G, int VPT, int R>() {
          const int64_t units = ceil_div(s.n_runs, kShortUnit);
          const int64_t blocks =
              std::min<int64_t>(max_blocks + 1, ceil_div(units, kShortBlock / G));
          for (const BackwardArgs* x : {&s, &ps})
            emu::launch(static_cast<unsigned>(blocks), kShortBlock,
                        &embedding_bag_backward_short_kernel<T, VEC, G, VPT, R>, *x);
        });
      if (!short_runs) return;
      point_at(short_out);
      ++g_short_launches;
      g_short_widths.push_back(VEC);
      with_short_run_shape<VEC>(dim / VEC, [&]<int G, int VPT, int R>() {
        short_shape =
            std::string(" short R") + std::to_string(R) +
            (use_short_run_backward(a.n_runs, a.n_segments, a.n_long_runs, a.lookups, dim / VEC)
                 ? " (picked)"
                 : "");
        const int64_t units = ceil_div(a.n_runs, kShortUnit);
        const int64_t blocks = std::min<int64_t>(max_blocks, ceil_div(units, kShortBlock / G));
        emu::launch(static_cast<unsigned>(blocks), kShortBlock,
                    &embedding_bag_backward_short_kernel<T, VEC, G, VPT, R>, a);
      });
      point_at(seg_out);
    });
    const int64_t items = a.n_long_runs * ceil_div(dim, kReduceBlock);
    if (items > 0)
      emu::launch(static_cast<unsigned>(std::min<int64_t>(2, items)), kReduceBlock,
                  &embedding_bag_backward_reduce_kernel<T>, a);
    const int64_t static_items = s.n_long_runs * ceil_div(dim, kReduceBlock);
    if (static_items > 0)
      for (const BackwardArgs* x : {&s, &ps})
        emu::launch(static_cast<unsigned>(std::min<int64_t>(3, static_items)), kReduceBlock,
                    &embedding_bag_backward_reduce_kernel<T>, *x);
  }

  // Reference.
  std::vector<int64_t> want_rows;
  for (int64_t p = 0; p < n; ++p)
    if (L.ok(p)) want_rows.push_back(L.idx[p]);
  std::sort(want_rows.begin(), want_rows.end());
  want_rows.erase(std::unique(want_rows.begin(), want_rows.end()), want_rows.end());
  std::vector<double> dense(rows * dim, 0.0);
  std::vector<int64_t> count(rows, 0);
  for (int64_t p = 0; p < n; ++p) {
    if (!L.ok(p)) continue;
    ++count[L.idx[p]];
    if (exact)
      for (int64_t d = 0; d < dim; ++d)
        dense[L.idx[p] * dim + d] += L.w[p] * gd[(p / bag) * dim + d];
  }
  const int64_t max_run = rows > 0 ? *std::max_element(count.begin(), count.end()) : 0;
  auto check = [&](BackwardOutputs<T>& o) {
    std::string bad;
    if (first_bad != L.first_bad()) bad = "first_bad " + std::to_string(first_bad);
    if (hot > 0 && a.n_long_runs == 0) bad = "the case has no run longer than a segment";
    if (bad.empty() &&
        (static_cast<int64_t>(want_rows.size()) != n_runs || o.rows_out != want_rows))
      bad = "rows differ (" + std::to_string(n_runs) + " vs " + std::to_string(want_rows.size()) +
            ")";
    if (!exact) return bad;
    for (int64_t u = 0; u < n_runs && bad.empty(); ++u)
      for (int64_t d = 0; d < dim && bad.empty(); ++d) {
        const double want = rounded<T>(dense[want_rows[u] * dim + d]),
                     got = to_double(o.rows_grad[u * dim + d]);
        if (!same(got, want))
          bad = "rows_grad[" + std::to_string(u) + "," + std::to_string(d) +
                "] = " + std::to_string(got) + ", want " + std::to_string(want);
      }
    for (int64_t p = 0; p < n && bad.empty() && need_wg; ++p) {
      double exact_dot = 0;
      if (L.ok(p))
        for (int64_t d = 0; d < dim; ++d)
          exact_dot += gd[(p / bag) * dim + d] * vd[L.idx[p] * dim + d];
      const double want =
          w_f32 ? static_cast<double>(static_cast<float>(exact_dot)) : rounded<T>(exact_dot);
      const double got = w_f32 ? static_cast<double>(o.wg_f[p]) : to_double(o.wg_t[p]);
      if (!same(got, want))
        bad = "weights_grad[" + std::to_string(p) + "] = " + std::to_string(got) + ", want " +
              std::to_string(want);
    }
    return bad;
  };
  // Whether another launch's weight gradient is the segment kernel's, bit for bit.
  auto same_weights_grad = [&](auto& wg_f, auto& wg_t) {
    return !need_wg || (w_f32 ? std::memcmp(wg_f.data(), seg_out.wg_f.data(), n * sizeof(float))
                              : std::memcmp(wg_t.data(), seg_out.wg_t.data(), n * sizeof(T))) == 0;
  };
  // The static launch against the segment kernel's outputs, bit for bit: each touched
  // row's gradient at its row, every other row untouched (still poison), the same weight
  // gradient; and the exact counts within their bounds.
  auto check_static = [&](StaticOutputs<T>& o) -> std::string {
    if (n_runs > bound.runs || g.info[kSegments] > bound.segments ||
        g.info[kLongSlots] > bound.long_slots || g.info[kLongRuns] > bound.long_runs)
      return "counts exceed backward_bounds";
    std::vector<char> poisoned(dim * sizeof(T), char(0xff));
    int64_t u = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const void* got = &o.dense[r * dim];
      if (u < n_runs && seg_out.rows_out[u] == r) {
        if (std::memcmp(got, &seg_out.rows_grad[u * dim], dim * sizeof(T)) != 0)
          return "dense row " + std::to_string(r) + " differs from the segment kernel's";
        ++u;
      } else if (std::memcmp(got, poisoned.data(), dim * sizeof(T)) != 0) {
        return "dense row " + std::to_string(r) + " was written but no lookup touches it";
      }
    }
    if (!same_weights_grad(o.wg_f, o.wg_t)) return "weights_grad differs from the segment kernel's";
    return "";
  };
  // The fixed-size sparse launch against the segment kernel's outputs, bit for bit: the
  // exact count of rows and their gradients in the first slots, the padding after them
  // untouched (rows -1, gradients still poison), the same weight gradient.
  auto check_padded = [&](PaddedOutputs<T>& o) -> std::string {
    for (int64_t u = 0; u < bound.runs; ++u) {
      const int64_t want = u < n_runs ? seg_out.rows_out[u] : -1;
      if (o.rows_out[u] != want)
        return "rows_out[" + std::to_string(u) + "] = " + std::to_string(o.rows_out[u]) +
               ", want " + std::to_string(want);
    }
    if (std::memcmp(o.rows_grad.data(), seg_out.rows_grad.data(), n_runs * dim * sizeof(T)) != 0)
      return "rows_grad differs from the segment kernel's";
    std::vector<char> poisoned(dim * sizeof(T), char(0xff));
    for (int64_t u = n_runs; u < bound.runs; ++u)
      if (std::memcmp(&o.rows_grad[u * dim], poisoned.data(), dim * sizeof(T)) != 0)
        return "rows_grad slot " + std::to_string(u) + " past the count was written";
    if (!same_weights_grad(o.wg_f, o.wg_t)) return "weights_grad differs from the segment kernel's";
    return "";
  };
  char name[300];
  std::snprintf(name, sizeof name,
                "backward %s vec%d %s dim %lld lookups %lld rows %lld longest run %lld (%lld "
                "segments, %lld long) "
                "idx%s w%s%s bad %d%s%s",
                emu::type_name<T>(), vec, shape.c_str(), (long long)dim, (long long)n,
                (long long)rows, (long long)max_run, (long long)a.n_segments,
                (long long)a.n_long_runs, idx64 ? "64" : "32", w_f32 ? "f32" : emu::type_name<T>(),
                need_wg ? " wg" : "", n_bad == kEveryLookupBad ? int(n) : n_bad, off.name().c_str(),
                exact ? "" : " rough");
  emu::report(check(seg_out).empty(), name, check(seg_out));
  emu::report(check_static(static_out).empty(), std::string(name) + " static",
              check_static(static_out));
  emu::report(check_padded(padded_out).empty(), std::string(name) + " padded",
              check_padded(padded_out));
  if (!short_runs) return;
  std::string bad = check(short_out);
  // Bit for bit the segment kernel's outputs (rough inputs make the order visible).
  if (bad.empty() && std::memcmp(short_out.rows_grad.data(), seg_out.rows_grad.data(),
                                 n_runs * dim * sizeof(T)) != 0)
    bad = "rows_grad differs from the segment kernel's";
  if (bad.empty() && !same_weights_grad(short_out.wg_f, short_out.wg_t))
    bad = "weights_grad differs from the segment kernel's";
  emu::report(bad.empty(), std::string(name) + short_shape, bad);
}

template <typename T>
void backward_cases() {
  constexpr int V = kVec16<T>;
  int k = 0;
  for (int64_t n : {1, 5, 8, 16, 17, 32, 33, 128, 129, 512, 513}) {
    const bool idx64 = (k % 2) == 0, w_f32 = std::is_same_v<T, float> || (k % 3) != 0;
    backward_case<T>(n * V, 9, 7, 20, 0.0, idx64, w_f32, true, (k % 3) == 0 ? 2 : 0);
    backward_case<T>(n * V, 6, 5, 9, 0.0, !idx64, w_f32, false, 0);
    ++k;
  }
  // Runs longer than a segment: partial rows folded by the second kernel.
  for (int64_t n : {1, 8, 32, 128}) {
    backward_case<T>(n * V, 6, 100, 6, 0.95, true, true, true, 1);
    ++k;
  }
  // Many short runs around one hot row of three segments: the segment-to-run search
  // window (n_segments - n_runs wide) is neither empty nor the whole plan.
  backward_case<T>(4 * V, 40, 50, 400, 0.6, false, true, true, 0);
  // Tiled rows (two tiles) with a long run: the costliest case to emulate, so one dtype.
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    backward_case<T>(513 * V, 6, 90, 4, 1.0, false, false, true, 0);
  // Rows that are not a whole number of 16-byte vectors: narrower vectors, down to one
  // element (dims 1, 3, 33).
  for (int64_t dim : {1, 3, 4, 6, 12, 33, 36, 130, 132}) {
    backward_case<T>(dim, 8, 9, 15, 0.0, true, (k % 2) == 0, true, (k % 2) ? 1 : 0);
    ++k;
  }
  for (int64_t dim : {5, 6, 12}) backward_case<T>(dim, 6, 100, 6, 0.95, false, true, true, 0);
  // Every lookup bad (index -1, the padding of merged calls, and past the end): only the
  // fixed-size launches run, over their bounds, and must write nothing.
  for (int64_t n : {1, 8})
    backward_case<T>(n * V, 5, 4, 30, 0.0, (k++ % 2) == 0, true, true, kEveryLookupBad);
  if constexpr (std::is_same_v<T, float>)
    backward_case<T>(131, 6, 90, 4, 1.0, true, true, true, 0);  // tiled, one element
  if constexpr (std::is_same_v<T, __half>)
    backward_case<T>(1026, 6, 90, 4, 1.0, true, true, true, 0);  // tiled, 4-byte vectors
  // Views with a storage offset: each vector-accessed base (and the weights) in turn, on a
  // short row (sub-warps) and a row of several accesses per thread; one long run.
  for (int o : view_offsets<T>()) {
    for (int64_t n : {4, 33})
      for (int which = 0; which < 4; ++which) {
        Offsets off;
        (which == 0   ? off.values
         : which == 1 ? off.grad_out
         : which == 2 ? off.out
                      : off.weights) = o;
        backward_case<T>(n * V, 8, 9, 15, 0.0, (k % 2) == 0, (k % 3) != 0, true, 0, off);
        ++k;
      }
    Offsets off;
    off.grad_out = o;
    backward_case<T>(8 * V, 6, 100, 6, 0.95, true, true, true, 0, off);
  }
  check_widths<T>("backward");

  // The short-run schedule where the launcher picks it: mostly unique rows over several
  // units of kShortUnit runs, on one block (so the unit loop strides) and on three, for
  // every group shape; runs of a few positions that cross chunks of R; rough inputs, whose
  // rounded sums the two schedules must produce bit for bit; bad lookups.
  for (int64_t n : {1, 5, 8, 16, 17, 32, 33, 128}) {
    const bool idx64 = (k % 2) == 0, w_f32 = std::is_same_v<T, float> || (k % 3) != 0;
    backward_case<T>(n * V, 60, 5, 700, 0.0, idx64, w_f32, true, 0, {}, true, 1);
    backward_case<T>(n * V, 30, 7, 60, 0.0, !idx64, w_f32, (k % 2) == 0, (k % 3) == 0 ? 3 : 0);
    backward_case<T>(n * V, 40, 5, 300, 0.0, idx64, !w_f32, true, 0, {}, false, 2);
    backward_case<T>(n * V, 24, 8, 50, 0.0, !idx64, w_f32, true, 2, {}, false);
    ++k;
  }
  for (int64_t dim : {1, 3, 6, 12, 33, 36})
    backward_case<T>(dim, 40, 5, 300, 0.0, (k++ % 2) == 0, true, true, 0, {}, false);
  emu::report(g_static_launches > 0 && g_static_short_picked > 0,
              std::string("backward ") + emu::type_name<T>() +
                  " static sizes: " + std::to_string(g_static_launches) + " launches, " +
                  std::to_string(g_static_short_picked) + " on the short-run schedule",
              "never launched, or the short-run schedule never picked");
  g_static_launches = g_static_short_picked = 0;
  emu::report(g_short_launches > 0 && g_short_picked > 0,
              std::string("backward ") + emu::type_name<T>() +
                  " short-run schedule: " + std::to_string(g_short_launches) + " launches, " +
                  std::to_string(g_short_picked) + " picked by the launcher",
              "never launched or never picked");
  g_short_launches = g_short_picked = 0;
  g_widths = g_short_widths;  // the short-run schedule too reaches every width
  g_short_widths.clear();
  check_widths<T>("backward short-run schedule");
}

// ---------------------------------------------------------------------------------------
// rows_to_dense and its checks.

template <typename W>
void dense_case(int64_t units, int64_t n_rows, std::vector<int64_t> rows, const char* what) {
  const bool sorted_rows = std::is_sorted(rows.begin(), rows.end());
  const int64_t n_unique = static_cast<int64_t>(rows.size());
  std::vector<W> src(std::max<int64_t>(n_unique * units, 1)), dst(n_rows * units);
  for (auto& x : src) {
    unsigned char* b = reinterpret_cast<unsigned char*>(&x);
    for (size_t i = 0; i < sizeof(W); ++i) b[i] = static_cast<unsigned char>(rng() | 1);  // never 0
  }
  emu::poison(dst);
  // The kernel's own rule for bad rows: out of range is skipped, the last of duplicates wins.
  std::vector<int64_t> want_slot(n_rows, -1);
  for (int64_t u = 0; u < n_unique; ++u)
    if (rows[u] >= 0 && rows[u] < n_rows) want_slot[rows[u]] = std::max(want_slot[rows[u]], u);
  const unsigned grid = static_cast<unsigned>(
      std::min<int64_t>(2, std::max<int64_t>(1, ceil_div(n_rows, kDenseRows))));
  emu::launch(grid, kDenseBlock, &rows_to_dense_kernel<W>, static_cast<const int64_t*>(rows.data()),
              n_unique, static_cast<const W*>(src.data()), dst.data(), n_rows, units);
  std::string bad;
  for (int64_t r = 0; r < n_rows && bad.empty(); ++r) {
    if (!sorted_rows && want_slot[r] >= 0) {
      // Unsorted (unchecked) rows: a row may be missed by the binary searches and stay
      // zero, or get any of its gradients; it is never anything else.
      bool zero_row = true;
      for (int64_t x = 0; x < units; ++x) {
        W z{};
        zero_row = zero_row && std::memcmp(&dst[r * units + x], &z, sizeof(W)) == 0;
      }
      bool copy = false;
      for (int64_t u = 0; u < n_unique; ++u)
        copy = copy || (rows[u] == r &&
                        std::memcmp(&dst[r * units], &src[u * units], units * sizeof(W)) == 0);
      if (!zero_row && !copy)
        bad = "row " + std::to_string(r) + " is neither zero nor one of its gradients";
      continue;
    }
    const void* want =
        want_slot[r] >= 0 ? static_cast<const void*>(&src[want_slot[r] * units]) : nullptr;
    for (int64_t x = 0; x < units && bad.empty(); ++x) {
      W zero{};
      const void* w = want
                          ? static_cast<const void*>(static_cast<const char*>(want) + x * sizeof(W))
                          : static_cast<const void*>(&zero);
      if (std::memcmp(&dst[r * units + x], w, sizeof(W)) != 0) bad = "row " + std::to_string(r);
    }
  }
  char name[160];
  std::snprintf(name, sizeof name, "rows_to_dense %zu-byte units x %lld, %lld of %lld rows, %s",
                sizeof(W), (long long)units, (long long)n_unique, (long long)n_rows, what);
  emu::report(bad.empty(), name, bad);
}

void check_rows_case(std::vector<int64_t> rows, int64_t n_rows, int64_t want) {
  unsigned long long first_bad = ~0ull;
  emu::launch(2, kDenseBlock, &check_rows_kernel, static_cast<const int64_t*>(rows.data()),
              static_cast<int64_t>(rows.size()), n_rows, &first_bad);
  const int64_t got = first_bad == ~0ull ? -1 : static_cast<int64_t>(first_bad);
  emu::report(got == want, "check_rows want " + std::to_string(want), "got " + std::to_string(got));
}

// embedding_bag_backward_padded's padding: rows [count, capacity) zeroed, the rows below
// the count (the backward's) untouched.
template <typename W>
void zero_padding_case(int64_t units, int64_t capacity, int64_t count, unsigned grid) {
  std::vector<W> dst(std::max<int64_t>(capacity * units, 1));
  emu::poison(dst);
  const std::vector<int64_t> count_on_device{count};
  emu::launch(grid, kDenseBlock, &zero_rows_from_count_kernel<W>, count_on_device.data(),
              dst.data(), capacity, units);
  std::vector<unsigned char> poisoned(units * sizeof(W), 0xff), zero(units * sizeof(W), 0);
  std::string bad;
  for (int64_t r = 0; r < capacity && bad.empty(); ++r)
    if (std::memcmp(&dst[r * units], r < count ? poisoned.data() : zero.data(),
                    units * sizeof(W)) != 0)
      bad = "row " + std::to_string(r) + (r < count ? " below the count was written" : " not zero");
  char name[160];
  std::snprintf(name, sizeof name, "zero padding %zu-byte units x %lld, rows %lld of %lld, grid %u",
                sizeof(W), (long long)units, (long long)count, (long long)capacity, grid);
  emu::report(bad.empty(), name, bad);
}

template <typename W>
void dense_cases() {
  std::vector<int64_t> sparse;
  for (int64_t r = 0; r < 150; ++r)
    if (rng() % 3 == 0 || r == 0 || r == 149) sparse.push_back(r);
  for (int64_t units : {1, 3, 40}) dense_case<W>(units, 150, sparse, "sorted");
  dense_case<W>(2, 70, {}, "none");
  dense_case<W>(2, 70, {-3, 1, 5, 5, 69, 70, 400}, "unchecked: out of range and duplicates");
  dense_case<W>(2, 70, {40, 3, 9, 2}, "unchecked: unsorted");
  // Counts at, inside and past a block's rows (kDenseRows), none and all; one block
  // striding over several ranges and as many blocks as ranges.
  for (int64_t count : {0, 5, kDenseRows, kDenseRows + 7, 100})
    for (unsigned grid : {1u, 4u}) zero_padding_case<W>(3, 100, count, grid);
  zero_padding_case<W>(40, 33, 1, 2);
}

int main(int argc, char** argv) {
  // Optional argument: run only the sections whose name contains it.
  const std::string only = argc > 1 ? argv[1] : "";
  const auto t0 = std::chrono::steady_clock::now();
  auto section = [&](const char* name, void (*fn)()) {
    if (!only.empty() && std::string(name).find(only) == std::string::npos) return;
    fn();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("-- %s done at %.1f s\n", name, s);
  };
  section("forward f32", forward_cases<float>);
  section("forward f64", forward_cases<double>);
  section("forward bf16", forward_cases<__nv_bfloat16>);
  section("forward f16", forward_cases<__half>);
  section("backward f32", backward_cases<float>);
  section("backward f64", backward_cases<double>);
  section("backward bf16", backward_cases<__nv_bfloat16>);
  section("backward f16", backward_cases<__half>);
  section("rows_to_dense", [] {
    dense_cases<uint4>();
    dense_cases<unsigned long long>();
    dense_cases<unsigned int>();
    dense_cases<unsigned short>();
    dense_cases<unsigned char>();
    check_rows_case({0, 4, 9, 12}, 13, -1);
    check_rows_case({0, 4, 13, 12}, 13, 2);
    check_rows_case({0, 4, 4, 12}, 13, 2);
    check_rows_case({-1, 4, 5}, 13, 0);
  });
  return emu::summary();
}

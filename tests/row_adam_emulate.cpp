// CPU emulation of the CUDA row_adam_ kernel (csrc/cuda/row_adam_kernel.cuh), for machines
// without a GPU. The kernel is compiled unchanged as host C++ against the CUDA emulation of
// tests/cuda_emulate.h and launched on grids of one to three blocks, so the grid-stride
// loop runs several rounds. Dims and views with a storage offset take every vector width
// (16, 8, 4 bytes, one element), rows of 1030 and 2056 take several passes of a block.
// The count kernel of row_adam_capturable_ is launched before it in some cases. Each case
// checks, bit for bit: every element of a touched row
// equals torch.optim.AdamW's update written out here in the state's precision; every
// untouched row (and its moments) is unchanged; rows out of range are skipped.
//
// Build: g++ -std=c++20 -O2 -pthread -fno-strict-aliasing -Icsrc/include -Icsrc/cuda -Itests
//        tests/row_adam_emulate.cpp   (see tests/cuda_emulate.h for sanitizers)
// Run:   ./a.out   (exit status 0 when every case matches)
#include "cuda_emulate.h"  // first: the kernel below compiles against it

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "memory_ext/launch_rules.h"
#include "row_adam_kernel.cuh"

using namespace memory_ext::cuda;
using memory_ext::RowAdamCoefficients;

namespace {

std::mt19937_64 rng(2024);

using emu::from_float;
using emu::narrow;
using emu::widen;

float random_value() { return static_cast<float>(static_cast<int>(rng() % 201) - 100) / 64; }

template <typename A>
bool same_bits(const A& a, const A& b) {
  return std::memcmp(&a, &b, sizeof(A)) == 0;
}

// AdamW's update of one element, as torch.optim.AdamW computes it (decoupled decay, lerp
// for the first moment, bias-corrected step), in the state's precision S.
template <typename S>
S adamw(S p, S g, S& m, S& v, const RowAdamCoefficients<S>& c) {
  m += (S(1) - c.beta1) * (g - m);
  v = v * c.beta2 + (S(1) - c.beta2) * g * g;
  const S denom = std::sqrt(v) / c.bc2_sqrt + c.eps;
  return p * c.decay - c.step_size * m / denom;
}

// Byte offsets of the four buffers from 16-byte alignment (views with a storage offset).
struct Offsets {
  int param = 0, exp_avg = 0, exp_avg_sq = 0, grad = 0;
  std::string name() const {
    std::string s;
    auto add = [&](const char* what, int o) {
      if (o != 0) s += std::string(", ") + what + "+" + std::to_string(o);
    };
    add("param", param);
    add("exp_avg", exp_avg);
    add("exp_avg_sq", exp_avg_sq);
    add("grad", grad);
    return s;
  }
};

// The vector widths (elements per access) launched so far, to check that the grid of a
// dtype reached every width of the step-down.
std::vector<int> g_widths;

// counted: the coefficients come from row_adam_count_kernel (row_adam_capturable_), which
// must advance the count from 6 to 7 and write step 7's coefficients; the kernel is then
// given zero coefficients by value, which it must ignore.
template <typename T>
void row_adam_case(int64_t n_rows, int64_t dim, std::vector<int64_t> rows, unsigned blocks,
                   const char* what, Offsets off = {}, bool counted = false) {
  using S = acc_t<T>;
  const int64_t n_unique = static_cast<int64_t>(rows.size());
  emu::OffsetBuffer<T> param(n_rows * dim, off.param), grad(n_unique * dim, off.grad);
  emu::OffsetBuffer<S> m(n_rows * dim, off.exp_avg), v(n_rows * dim, off.exp_avg_sq);
  for (int64_t i = 0; i < param.size(); ++i) param[i] = from_float<T>(random_value());
  for (int64_t i = 0; i < grad.size(); ++i) grad[i] = from_float<T>(random_value());
  for (int64_t i = 0; i < m.size(); ++i) m[i] = static_cast<S>(random_value());
  for (int64_t i = 0; i < v.size(); ++i) v[i] = static_cast<S>(std::fabs(random_value()));
  const auto c = RowAdamCoefficients<S>::make(1e-2, 0.9, 0.999, 1e-8, 0.01, 7);
  std::vector<T> want_p(param.data(), param.data() + param.size());
  std::vector<S> want_m(m.data(), m.data() + m.size()), want_v(v.data(), v.data() + v.size());
  for (int64_t u = 0; u < n_unique; ++u) {
    if (rows[u] < 0 || rows[u] >= n_rows) continue;
    for (int64_t i = 0; i < dim; ++i) {
      const int64_t at = rows[u] * dim + i;
      want_p[at] = narrow<T>(
          adamw<S>(widen(param[at]), widen(grad[u * dim + i]), want_m[at], want_v[at], c));
    }
  }
  // The launcher's choices (row_adam.cu): the vector, then the lanes per row.
  constexpr int kMax = kRowAdamMaxVec<S>;
  const int vec = widest_vector(dim, kMax,
                                {{param.data(), sizeof(T)},
                                 {m.data(), sizeof(S)},
                                 {v.data(), sizeof(S)},
                                 {grad.data(), sizeof(T)}});
  g_widths.push_back(vec);
  int lanes = 0;
  int64_t step = 6;
  RowAdamCoefficients<S> on_device{};
  if (counted)
    emu::launch(1u, kRowAdamCountThreads, &row_adam_count_kernel<S>, &step, &on_device, 1e-2, 0.9,
                0.999, 1e-8, 0.01);
  with_vector<kMax>(vec, [&]<int VEC>() {
    const int lanes_log2 = row_adam_lanes_log2(dim, VEC);
    lanes = 1 << lanes_log2;
    emu::launch(blocks, kRowAdamBlock, &row_adam_kernel<T, S, VEC>, param.data(), m.data(),
                v.data(), static_cast<const int64_t*>(rows.data()),
                static_cast<const T*>(grad.data()), n_unique, dim, n_rows, lanes_log2,
                counted ? RowAdamCoefficients<S>{} : c,
                counted ? static_cast<const RowAdamCoefficients<S>*>(&on_device) : nullptr);
  });
  std::string bad;
  if (counted && step != 7) bad = "the count went from 6 to " + std::to_string(step);
  for (int64_t at = 0; at < n_rows * dim && bad.empty(); ++at)
    if (!same_bits(param[at], want_p[at]) || !same_bits(m[at], want_m[at]) ||
        !same_bits(v[at], want_v[at]))
      bad = "element " + std::to_string(at) + " (row " + std::to_string(at / dim) + ")";
  char name[260];
  std::snprintf(name, sizeof name,
                "row_adam%s %s vec%d, %d lanes per row, dim %lld, %lld of %lld rows, %u blocks, "
                "%s%s",
                counted ? " (count on the device)" : "", emu::type_name<T>(), vec, lanes,
                static_cast<long long>(dim), static_cast<long long>(n_unique),
                static_cast<long long>(n_rows), blocks, what, off.name().c_str());
  emu::report(bad.empty(), name, bad);
}

template <typename T>
void row_adam_cases() {
  using S = acc_t<T>;
  std::vector<int64_t> sparse;
  for (int64_t r = 0; r < 60; ++r)
    if (rng() % 3 == 0 || r == 0 || r == 59) sparse.push_back(r);
  // Every width: 16 bytes of state (dims 4, 8, 36, 132; 8 for float64), 8 bytes (6, 130),
  // one element (1, 3, 33); rows of one pass, and of several (1030, 2056).
  for (int64_t dim : {1, 3, 4, 6, 8, 33, 36, 130, 132})
    for (unsigned blocks : {1u, 3u}) row_adam_case<T>(60, dim, sparse, blocks, "ascending");
  std::vector<int64_t> few = {0, 7, 8, 19};
  for (int64_t dim : {1030, 2056}) row_adam_case<T>(20, dim, few, 2, "long rows");
  row_adam_case<T>(60, 5, {}, 1, "no rows");
  // row_adam_capturable_: the count and coefficients on the device, at two widths.
  for (int64_t dim : {3, 36}) row_adam_case<T>(60, dim, sparse, 3, "ascending", {}, true);
  row_adam_case<T>(60, 5, {-4, 2, 9, 60, 400}, 2, "unchecked: rows out of range are skipped");
  // Views with a storage offset: each base in turn.
  for (int o : {2, 4, 8})
    for (int which = 0; which < 4; ++which) {
      Offsets off;
      int& at = which == 0   ? off.param
                : which == 1 ? off.exp_avg
                : which == 2 ? off.exp_avg_sq
                             : off.grad;
      if (o % (which == 1 || which == 2 ? sizeof(S) : sizeof(T)) != 0) continue;
      at = o;
      row_adam_case<T>(60, 64, sparse, 2, "view", off);
    }
  std::string missing;
  for (int w = kRowAdamMaxVec<S>; w >= 1; w /= 2)
    if (std::find(g_widths.begin(), g_widths.end(), w) == g_widths.end())
      missing += " " + std::to_string(w);
  emu::report(missing.empty(),
              std::string("row_adam ") + emu::type_name<T>() + " reaches every width",
              "never launched with" + missing);
  g_widths.clear();
}

}  // namespace

int main() {
  row_adam_cases<float>();
  row_adam_cases<double>();
  row_adam_cases<__nv_bfloat16>();
  row_adam_cases<__half>();
  return emu::summary();
}

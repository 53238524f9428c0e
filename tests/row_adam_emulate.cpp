// CPU emulation of the CUDA row_adam_ kernel (csrc/cuda/row_adam_kernel.cuh), for machines
// without a GPU. The kernel is compiled unchanged as host C++ against the CUDA emulation of
// tests/cuda_emulate.h and launched on grids of one to three blocks, so the grid-stride
// loop runs several rounds. Each case checks, bit for bit: every element of a touched row
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

template <typename T>
void row_adam_case(int64_t n_rows, int64_t dim, std::vector<int64_t> rows, unsigned blocks,
                   const char* what) {
  using S = acc_t<T>;
  const int64_t n_unique = static_cast<int64_t>(rows.size());
  std::vector<T> param(n_rows * dim), grad(std::max<int64_t>(n_unique * dim, 1));
  std::vector<S> m(n_rows * dim), v(n_rows * dim);
  for (auto& x : param) x = from_float<T>(random_value());
  for (auto& x : grad) x = from_float<T>(random_value());
  for (auto& x : m) x = static_cast<S>(random_value());
  for (auto& x : v) x = static_cast<S>(std::fabs(random_value()));
  const auto c = RowAdamCoefficients<S>::make(1e-2, 0.9, 0.999, 1e-8, 0.01, 7);
  std::vector<T> want_p = param;
  std::vector<S> want_m = m, want_v = v;
  for (int64_t u = 0; u < n_unique; ++u) {
    if (rows[u] < 0 || rows[u] >= n_rows) continue;
    for (int64_t i = 0; i < dim; ++i) {
      const int64_t at = rows[u] * dim + i;
      want_p[at] = narrow<T>(
          adamw<S>(widen(param[at]), widen(grad[u * dim + i]), want_m[at], want_v[at], c));
    }
  }
  emu::launch(blocks, kRowAdamBlock, &row_adam_kernel<T, S>, param.data(), m.data(), v.data(),
              static_cast<const int64_t*>(rows.data()), static_cast<const T*>(grad.data()),
              n_unique, dim, n_rows, c);
  std::string bad;
  for (int64_t at = 0; at < n_rows * dim && bad.empty(); ++at)
    if (!same_bits(param[at], want_p[at]) || !same_bits(m[at], want_m[at]) ||
        !same_bits(v[at], want_v[at]))
      bad = "element " + std::to_string(at) + " (row " + std::to_string(at / dim) + ")";
  char name[160];
  std::snprintf(name, sizeof name, "row_adam %s dim %lld, %lld of %lld rows, %u blocks, %s",
                emu::type_name<T>(), static_cast<long long>(dim), static_cast<long long>(n_unique),
                static_cast<long long>(n_rows), blocks, what);
  emu::report(bad.empty(), name, bad);
}

template <typename T>
void row_adam_cases() {
  std::vector<int64_t> sparse;
  for (int64_t r = 0; r < 60; ++r)
    if (rng() % 3 == 0 || r == 0 || r == 59) sparse.push_back(r);
  for (int64_t dim : {1, 3, 33, 130})
    for (unsigned blocks : {1u, 3u}) row_adam_case<T>(60, dim, sparse, blocks, "ascending");
  row_adam_case<T>(60, 5, {}, 1, "no rows");
  row_adam_case<T>(60, 5, {-4, 2, 9, 60, 400}, 2, "unchecked: rows out of range are skipped");
}

}  // namespace

int main() {
  row_adam_cases<float>();
  row_adam_cases<double>();
  row_adam_cases<__nv_bfloat16>();
  row_adam_cases<__half>();
  return emu::summary();
}

// CPU emulation of the CUDA row_adagrad_ kernel (csrc/cuda/row_adagrad_kernel.cuh), for
// machines without a GPU. The kernel is compiled unchanged as host C++ against the CUDA
// emulation of tests/cuda_emulate.h and launched on grids of one to three blocks of eight
// warps, so the grid-stride loop over rows runs several rounds. Each case checks, bit for
// bit: every touched row's accumulator and elements equal row-wise Adagrad written out
// here with the summation order the kernel promises (lane l sums elements l, l + 32, ...
// in order, then an xor butterfly over offsets 16, 8, 4, 2, 1); every untouched row and
// its accumulator are unchanged; rows out of range are skipped. The accumulator is also
// checked against a float64 sum, which the order must not take it far from. Gradients have
// full mantissas over a range of exponents, so a different summation order shows.
//
// Build: g++ -std=c++20 -O2 -pthread -fno-strict-aliasing -Icsrc/include -Icsrc/cuda -Itests
//        tests/row_adagrad_emulate.cpp   (see tests/cuda_emulate.h for sanitizers)
// Run:   ./a.out   (exit status 0 when every case matches)
#include "cuda_emulate.h"  // first: the kernel below compiles against it

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "row_adagrad_kernel.cuh"

using namespace memory_ext::cuda;
using memory_ext::RowAdagradCoefficients;

namespace {

std::mt19937_64 rng(2025);

using emu::from_float;
using emu::narrow;
using emu::widen;

float random_value() { return static_cast<float>(static_cast<int>(rng() % 201) - 100) / 64; }

// Full mantissas over a range of exponents, so that sums of squares round and a different
// summation order gives different bits.
float random_gradient() {
  const float x = std::uniform_real_distribution<float>(-1.0f, 1.0f)(rng);
  return std::ldexp(x, static_cast<int>(rng() % 13) - 6);
}

template <typename A>
bool same_bits(const A& a, const A& b) {
  return std::memcmp(&a, &b, sizeof(A)) == 0;
}

// sum_i g_i^2 in the kernel's order: 32 strided partial sums, each in element order, then
// the butterfly (every lane ends with the same value; lane 0's is returned).
template <typename S>
S warp_order_squares(const std::vector<S>& g) {
  S lanes[32] = {};
  for (size_t i = 0; i < g.size(); ++i) lanes[i % 32] += g[i] * g[i];
  for (int offset = 16; offset > 0; offset /= 2) {
    S next[32];
    for (int l = 0; l < 32; ++l) next[l] = lanes[l] + lanes[l ^ offset];
    std::memcpy(lanes, next, sizeof(lanes));
  }
  return lanes[0];
}

template <typename T>
void row_adagrad_case(int64_t n_rows, int64_t dim, std::vector<int64_t> rows, unsigned blocks,
                      const char* what) {
  using S = acc_t<T>;
  const double lr = 0.05, eps = 1e-10, weight_decay = 0.01;
  const int64_t n_unique = static_cast<int64_t>(rows.size());
  std::vector<T> param(n_rows * dim), grad(std::max<int64_t>(n_unique * dim, 1));
  std::vector<S> sum_sq(n_rows);
  for (auto& x : param) x = from_float<T>(random_value());
  for (auto& x : grad) x = from_float<T>(random_gradient());
  for (auto& x : sum_sq) x = static_cast<S>(std::fabs(random_value()) / 16);
  const auto c = RowAdagradCoefficients<S>::make(lr, eps, weight_decay);
  std::vector<T> want_p = param;
  std::vector<S> want_s = sum_sq;
  std::string bad;
  for (int64_t u = 0; u < n_unique; ++u) {
    const int64_t r = rows[u];
    if (r < 0 || r >= n_rows) continue;
    std::vector<S> g(dim);
    double exact = 0;
    for (int64_t i = 0; i < dim; ++i) {
      g[i] = widen(grad[u * dim + i]);
      exact += double(g[i]) * double(g[i]);
    }
    const S s = want_s[r] + warp_order_squares(g) / S(dim);
    const double s_exact = double(want_s[r]) + exact / double(dim);
    const double u_acc = std::numeric_limits<S>::epsilon() / 2;
    if (std::fabs(double(s) - s_exact) > double(dim + 4) * u_acc * s_exact && bad.empty())
      bad = "the ordered sum of row " + std::to_string(r) + " is far from the float64 one";
    want_s[r] = s;
    const S step = c.lr / (std::sqrt(s) + c.eps);
    for (int64_t i = 0; i < dim; ++i) {
      const int64_t at = r * dim + i;
      want_p[at] = narrow<T>(widen(param[at]) * c.decay - step * g[i]);
    }
  }
  emu::launch(blocks, kRowAdagradBlock, &row_adagrad_kernel<T, S>, param.data(), sum_sq.data(),
              static_cast<const int64_t*>(rows.data()), static_cast<const T*>(grad.data()),
              n_unique, dim, n_rows, c);
  for (int64_t r = 0; r < n_rows && bad.empty(); ++r)
    if (!same_bits(sum_sq[r], want_s[r])) bad = "sum_sq of row " + std::to_string(r);
  for (int64_t at = 0; at < n_rows * dim && bad.empty(); ++at)
    if (!same_bits(param[at], want_p[at]))
      bad = "element " + std::to_string(at) + " (row " + std::to_string(at / dim) + ")";
  char name[160];
  std::snprintf(name, sizeof name, "row_adagrad %s dim %lld, %lld of %lld rows, %u blocks, %s",
                emu::type_name<T>(), static_cast<long long>(dim), static_cast<long long>(n_unique),
                static_cast<long long>(n_rows), blocks, what);
  emu::report(bad.empty(), name, bad);
}

template <typename T>
void row_adagrad_cases() {
  std::vector<int64_t> sparse;
  for (int64_t r = 0; r < 60; ++r)
    if (rng() % 3 == 0 || r == 0 || r == 59) sparse.push_back(r);
  // 1: one live lane; 7: a partial warp; 32, 64: whole warps; 33, 129: one lane further.
  for (int64_t dim : {1, 7, 32, 33, 64, 129})
    for (unsigned blocks : {1u, 3u}) row_adagrad_case<T>(60, dim, sparse, blocks, "ascending");
  row_adagrad_case<T>(60, 5, {}, 1, "no rows");
  row_adagrad_case<T>(60, 40, {-4, 2, 9, 60, 400}, 2, "unchecked: rows out of range are skipped");
}

}  // namespace

int main() {
  row_adagrad_cases<float>();
  row_adagrad_cases<double>();
  row_adagrad_cases<__nv_bfloat16>();
  row_adagrad_cases<__half>();
  return emu::summary();
}

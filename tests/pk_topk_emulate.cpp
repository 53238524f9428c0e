// CPU emulation of the CUDA pk_topk kernels (csrc/cuda/pk_topk_kernel.cuh), for machines
// without a GPU. The kernel source is compiled unchanged as host C++ against the CUDA
// emulation of tests/cuda_emulate.h (one host thread per CUDA thread; warp votes, barriers,
// tensor-core mma and cp.async copies emulated there) and its __global__ kernels are
// launched as the launcher would. Shared memory and the outputs start poisoned. Inputs are
// dyadic rationals small enough that every sum is exact in fp32 in any order, so results
// must equal a brute-force top-k over all n_keys^2 pairs bit for bit, ties (score desc,
// index asc) included.
//
// Build: g++ -std=c++20 -O2 -pthread -fno-strict-aliasing -Icsrc/include -Icsrc/cuda -Itests
//        tests/pk_topk_emulate.cpp   (see tests/cuda_emulate.h for sanitizers)
// Run:   ./a.out [case-number]   (exit status 0 when every case matches; set
//        MEMORY_EXT_EMU_EARLY_COPIES=1 to run async copies at issue)
#include "cuda_emulate.h"  // first: the kernels below compile against it

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "memory_ext/launch_rules.h"
#include "pk_topk_kernel.cuh"

namespace pk = memory_ext::cuda::pk;
using memory_ext::bit_cast;

namespace {

enum class Dtype { kBF16, kF16, kF32, kF64 };

struct Case {
  int64_t tokens;
  int heads, n_keys, half, k;
  Dtype dtype;
  bool tensor_cores;
  int nwarps;
  int levels;             // inputs are integers in [-levels, levels] / levels
  bool strided = false;   // query rows padded (non-contiguous)
  bool misalign = false;  // sub-key data starts 2 bytes past an aligned address
};

uint16_t to_bf16_bits(float x) { return static_cast<uint16_t>(bit_cast<uint32_t>(x) >> 16); }

uint16_t to_f16_bits(float x) {  // exact for the small dyadic values used here
  if (x == 0.f) return 0;
  const uint32_t f = bit_cast<uint32_t>(x);
  const int e = static_cast<int>((f >> 23) & 0xFF) - 127;
  return static_cast<uint16_t>(((f >> 31) << 15) | ((e + 15) << 10) | ((f & 0x7FFFFF) >> 13));
}

template <typename Raw>
Raw nan_raw(bool bf16) {
  if constexpr (std::is_same_v<Raw, uint16_t>)
    return bf16 ? uint16_t{0x7FC0} : uint16_t{0x7E00};
  else
    return static_cast<Raw>(NAN);
}

struct Result {
  std::vector<double> scores;
  std::vector<int64_t> indices;
};

// The launcher's kernel for this case: tensor cores for bf16/fp16 when the case asks,
// with 16 or 32 k16-steps of query in registers.
template <class In>
void launch_kernel(const pk::Params& prm, const Case& c) {
  const int rows = prm.nwarps * pk::kRowsPerWarp;
  const dim3 grid(static_cast<unsigned>((prm.tokens + rows - 1) / rows),
                  static_cast<unsigned>(prm.heads));
  const unsigned block = static_cast<unsigned>(prm.nwarps * memory_ext::cuda::kWarpSize);
  const size_t smem = static_cast<size_t>(prm.layout.total);
  constexpr bool k16 = std::is_same_v<In, pk::InBF16> || std::is_same_v<In, pk::InF16>;
  if constexpr (k16) {
    if (c.tensor_cores) {
      constexpr bool bf = std::is_same_v<In, pk::InBF16>;
      if (pk::query_k16_steps(c.half) == 16)
        emu::launch(grid, block, smem, &pk::pk_topk_mma_kernel<bf, 16>, prm);
      else
        emu::launch(grid, block, smem, &pk::pk_topk_mma_kernel<bf, 32>, prm);
      return;
    }
  }
  emu::launch(grid, block, smem, &pk::pk_topk_plain_kernel<In>, prm);
}

// Runs the emulated kernel; fills res with (tokens, heads, k) outputs.
template <class In>
void emulate(const Case& c, const std::vector<double>& q, const std::vector<double>& keys,
             Result& res) {
  using Raw = typename In::Raw;
  using S = typename In::Score;
  const int width = 2 * c.half;
  const int row_pad = c.strided ? 3 : 0;
  const int64_t q_stride_h = width + row_pad, q_stride_t = c.heads * q_stride_h;
  auto convert = [&](double v) -> Raw {
    if constexpr (std::is_same_v<In, pk::InBF16>)
      return to_bf16_bits(static_cast<float>(v));
    else if constexpr (std::is_same_v<In, pk::InF16>)
      return to_f16_bits(static_cast<float>(v));
    else
      return static_cast<Raw>(v);
  };
  std::vector<Raw> qraw(std::max<int64_t>(1, c.tokens * q_stride_t), Raw{});
  for (int64_t t = 0; t < c.tokens; ++t)
    for (int h = 0; h < c.heads; ++h)
      for (int d = 0; d < width; ++d)
        qraw[t * q_stride_t + h * q_stride_h + d] = convert(q[(t * c.heads + h) * width + d]);
  const int shift = c.misalign ? 1 : 0;
  // NaN around the sub-keys: a read past the end (instead of a zero fill) poisons a score.
  std::vector<Raw> kraw(keys.size() + 72, nan_raw<Raw>(std::is_same_v<In, pk::InBF16>));
  for (size_t i = 0; i < keys.size(); ++i) kraw[i + shift] = convert(keys[i]);

  std::vector<S> scores(c.tokens * c.heads * c.k, bit_cast<float>(0x7FC00000u));  // NaN poison
  std::vector<int64_t> indices(c.tokens * c.heads * c.k, -1);

  pk::Params prm{};
  prm.query = qraw.data();
  prm.q_stride_t = q_stride_t;
  prm.q_stride_h = q_stride_h;
  prm.q_stride_d = 1;
  prm.keys = kraw.data() + shift;
  prm.scores = scores.data();
  prm.indices = indices.data();
  prm.tokens = c.tokens;
  prm.heads = c.heads;
  prm.n_keys = c.n_keys;
  prm.half = c.half;
  prm.k = c.k;
  prm.kp = pk::next_pow2(c.k);
  prm.npairs = pk::pair_count(c.k);
  prm.nwarps = c.nwarps;
  prm.vector_keys = memory_ext::cuda::use_vector_path(c.half, 8, {prm.keys});
  prm.layout = pk::make_layout(c.tensor_cores, sizeof(S), sizeof(typename pk::KeyOf<S>::type),
                               c.nwarps, prm.kp, prm.k, prm.npairs);
  launch_kernel<In>(prm, c);
  res.scores.assign(scores.begin(), scores.end());
  res.indices = indices;
}

// Brute force over all n_keys^2 pairs, exact in double for these inputs.
void reference(const Case& c, const std::vector<double>& q, const std::vector<double>& keys,
               Result& res) {
  const int n = c.n_keys, half = c.half;
  res.scores.assign(c.tokens * c.heads * c.k, 0);
  res.indices.assign(c.tokens * c.heads * c.k, 0);
  std::vector<double> s1(n), s2(n);
  std::vector<std::pair<double, int64_t>> all(static_cast<size_t>(n) * n);
  for (int64_t t = 0; t < c.tokens; ++t)
    for (int h = 0; h < c.heads; ++h) {
      const double* qq = &q[(t * c.heads + h) * 2 * half];
      for (int i = 0; i < n; ++i) {
        double a = 0, b = 0;
        for (int d = 0; d < half; ++d) {
          a += qq[d] * keys[((h * 2 + 0) * static_cast<int64_t>(n) + i) * half + d];
          b += qq[half + d] * keys[((h * 2 + 1) * static_cast<int64_t>(n) + i) * half + d];
        }
        s1[i] = a;
        s2[i] = b;
      }
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j)
          all[static_cast<size_t>(i) * n + j] = {s1[i] + s2[j], static_cast<int64_t>(i) * n + j};
      std::partial_sort(all.begin(), all.begin() + c.k, all.end(),
                        [](const auto& x, const auto& y) {
                          return x.first > y.first || (x.first == y.first && x.second < y.second);
                        });
      for (int j = 0; j < c.k; ++j) {
        res.scores[(t * c.heads + h) * c.k + j] = all[j].first;
        res.indices[(t * c.heads + h) * c.k + j] = all[j].second;
      }
    }
}

const char* dtype_name(Dtype d) {
  switch (d) {
    case Dtype::kBF16:
      return "bf16";
    case Dtype::kF16:
      return "fp16";
    case Dtype::kF32:
      return "fp32";
    default:
      return "fp64";
  }
}

bool run_case(const Case& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> dist(-c.levels, c.levels);
  const int width = 2 * c.half;
  std::vector<double> q(c.tokens * c.heads * width),
      keys(static_cast<size_t>(c.heads) * 2 * c.n_keys * c.half);
  for (auto& v : q) v = static_cast<double>(dist(rng)) / c.levels;
  for (auto& v : keys) v = static_cast<double>(dist(rng)) / c.levels;
  Result got, want;
  switch (c.dtype) {
    case Dtype::kBF16:
      emulate<pk::InBF16>(c, q, keys, got);
      break;
    case Dtype::kF16:
      emulate<pk::InF16>(c, q, keys, got);
      break;
    case Dtype::kF32:
      emulate<pk::InF32>(c, q, keys, got);
      break;
    case Dtype::kF64:
      emulate<pk::InF64>(c, q, keys, got);
      break;
  }
  reference(c, q, keys, want);
  int bad = 0;
  for (size_t i = 0; i < want.scores.size(); ++i) {
    if (got.scores[i] != want.scores[i] || got.indices[i] != want.indices[i]) {
      if (bad < 5)
        std::fprintf(stderr,
                     "  mismatch at %zu (t=%lld h=%lld j=%lld): got (%g, %lld) want (%g, %lld)\n",
                     i, static_cast<long long>(i / (c.heads * c.k)),
                     static_cast<long long>((i / c.k) % c.heads), static_cast<long long>(i % c.k),
                     got.scores[i], static_cast<long long>(got.indices[i]), want.scores[i],
                     static_cast<long long>(want.indices[i]));
      ++bad;
    }
  }
  char name[200];
  std::snprintf(name, sizeof name, "%s tokens=%lld heads=%d n_keys=%d half=%d k=%d %s warps=%d%s%s",
                dtype_name(c.dtype), static_cast<long long>(c.tokens), c.heads, c.n_keys, c.half,
                c.k, c.tensor_cores ? "mma" : "plain", c.nwarps, c.strided ? " strided" : "",
                c.misalign ? " misaligned" : "");
  emu::report(bad == 0, name, std::to_string(bad) + " of " + std::to_string(want.scores.size()));
  return bad == 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<Case> cases = {
      // tokens heads n_keys half k dtype tensor_cores warps levels
      {37, 2, 100, 48, 7, Dtype::kBF16, true, 2, 32},   // partial CTA, partial tile, partial chunk
      {20, 1, 64, 40, 32, Dtype::kF16, true, 1, 32},    // half not a multiple of 16
      {17, 1, 130, 37, 5, Dtype::kBF16, true, 1, 32},   // odd half: element-wise stage loads
      {16, 1, 64, 320, 64, Dtype::kBF16, true, 1, 16},  // 32 k16-steps, k == n_keys
      {9, 1, 70, 300, 3, Dtype::kF16, true, 1, 16},     // 32 k16-steps, half % 8 != 0
      {40, 3, 200, 64, 16, Dtype::kF16, true, 4, 32, true},  // strided query, 4 warps
      {16, 1, 64, 32, 32, Dtype::kBF16, true, 1, 1},         // values in {-1, 0, 1}: many ties
      {16, 1, 512, 32, 256, Dtype::kBF16, true, 1, 32},      // k = 256
      {12, 1, 96, 64, 9, Dtype::kBF16, true, 1, 32, false, true},  // misaligned sub-keys
      {33, 2, 300, 32, 64, Dtype::kF32, false, 2, 32, true},
      {9, 1, 256, 20, 256, Dtype::kF32, false, 1, 32},   // k == n_keys == 256
      {10, 1, 128, 16, 100, Dtype::kF64, false, 1, 32},  // k not a power of two
      {5, 1, 64, 24, 1, Dtype::kBF16, false, 1, 32},     // plain bf16 path, k = 1
      {18, 2, 80, 33, 12, Dtype::kF16, false, 2, 1},     // plain fp16 path, ties
      {8, 1, 70, 32, 70, Dtype::kBF16, true, 1, 32},     // k == n_keys, partial tile
      {8, 1, 70, 24, 70, Dtype::kF32, false, 1, 32},     // same, plain path
      // n_keys >> k, as in real layers: the running thresholds and repeated flushes matter
      {16, 1, 1024, 16, 32, Dtype::kBF16, true, 1, 32},
      {16, 1, 2048, 16, 8, Dtype::kF16, true, 1, 32},
      {16, 1, 1024, 16, 100, Dtype::kF32, false, 1, 32},
      {16, 1, 1000, 16, 256, Dtype::kBF16, true, 1, 32},
      {7, 2, 64, 0, 10, Dtype::kBF16, true, 1, 32},  // half 0: every score ties at 0
      {7, 1, 64, 0, 10, Dtype::kF32, false, 1, 32},
  };
  int only = argc > 1 ? std::atoi(argv[1]) : -1;
  bool ok = true;
  for (size_t i = 0; i < cases.size(); ++i) {
    if (only >= 0 && static_cast<int>(i) != only) continue;
    ok = run_case(cases[i], 1234 + i) && ok;
  }
  const int status = emu::summary();
  return ok ? status : 1;
}

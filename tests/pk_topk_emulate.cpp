// CPU emulation of the CUDA pk_topk kernels (csrc/cuda/pk_topk_kernel.cuh), for machines
// without a GPU. The kernel source is compiled unchanged as host C++ against the CUDA
// emulation of tests/cuda_emulate.h (one host thread per CUDA thread; warp votes, barriers,
// tensor-core mma and cp.async copies emulated there) and its __global__ kernels are
// launched as the launcher would. Shared memory and the outputs start poisoned. Inputs are
// dyadic rationals small enough that every sum is exact in fp32 in any order, so results
// must equal a brute-force top-k over all n_keys^2 pairs bit for bit, ties (score desc,
// index asc) included. On the TF32 path the reference rounds the operands to TF32 first
// (its own rounding, not the emulation's); the "inexact" cases perturb every input below
// TF32 precision so that only correctly rounded operands give back the dyadic values and
// hence the reference's scores and indices.
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
  bool tensor_cores;  // asks for them (fp32: torch allows TF32); see path_of
  int nwarps;
  int levels;             // inputs are integers in [-levels, levels] / levels
  bool strided = false;   // query rows padded (non-contiguous)
  bool misalign = false;  // sub-key data starts one element past a 16-byte aligned address
  bool inexact = false;   // fp32 inputs off TF32 values by less than half a TF32 unit
};

// The path the launcher takes for the case on an sm_90 GPU: tensor_cores asks for them
// (for fp32: torch allows TF32); bf16/fp16 cases without are run as on a pre-sm_80 GPU.
pk::ScorePath path_of(const Case& c) {
  const bool k16 = c.dtype == Dtype::kBF16 || c.dtype == Dtype::kF16;
  const pk::InputKind kind = c.dtype == Dtype::kBF16  ? pk::InputKind::kBF16
                             : c.dtype == Dtype::kF16 ? pk::InputKind::kF16
                             : c.dtype == Dtype::kF32 ? pk::InputKind::kF32
                                                      : pk::InputKind::kF64;
  return pk::choose_score_path(kind, c.half, k16 && !c.tensor_cores ? 7 : 9, c.tensor_cores);
}

// v rounded to TF32 (11 significant bits), to nearest with ties away from zero (std::round).
double tf32_reference(double v) {
  if (v == 0 || !std::isfinite(v)) return v;
  int e = 0;
  const double m = std::frexp(v, &e);  // |m| in [0.5, 1)
  return std::ldexp(std::round(std::ldexp(m, 11)), e - 11);
}

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

// The launcher's kernel for the case's path, with 16 or 32 k-steps of query in registers
// on tensor cores, or the query streamed from shared memory.
template <class In>
void launch_kernel(const pk::Params& prm, const Case& c) {
  const int rows = prm.nwarps * pk::kRowsPerWarp;
  const dim3 grid(static_cast<unsigned>((prm.tokens + rows - 1) / rows),
                  static_cast<unsigned>(prm.heads));
  const unsigned block = static_cast<unsigned>(prm.nwarps * memory_ext::cuda::kWarpSize);
  const size_t smem = static_cast<size_t>(prm.layout.total);
  constexpr bool mma = !std::is_same_v<In, pk::InF64>;
  const pk::ScorePath path = path_of(c);
  if constexpr (mma) {
    if (path != pk::ScorePath::kPlain) {
      const int steps = pk::query_mma_steps(path, c.half);
      if (steps == 16)
        emu::launch(grid, block, smem, &pk::pk_topk_mma_kernel<In, 16>, prm);
      else
        emu::launch(grid, block, smem, &pk::pk_topk_mma_kernel<In, pk::kStreamedQuery>, prm);
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
  prm.vector_keys = memory_ext::cuda::use_vector_path(c.half, 16 / sizeof(Raw), {prm.keys});
  const pk::ScorePath path = path_of(c);
  const bool streamed =
      path != pk::ScorePath::kPlain && pk::query_mma_steps(path, c.half) == pk::kStreamedQuery;
  prm.layout = pk::make_layout(
      path != pk::ScorePath::kPlain, sizeof(S), sizeof(typename pk::KeyOf<S>::type), c.nwarps,
      prm.kp, prm.k, prm.npairs,
      streamed ? pk::streamed_query_row_words(c.half, static_cast<int>(sizeof(Raw))) : 0);
  launch_kernel<In>(prm, c);
  res.scores.assign(scores.begin(), scores.end());
  res.indices = indices;
}

// Brute force over all n_keys^2 pairs, exact in double for these inputs (operands rounded
// to TF32 first, on the TF32 path).
void reference(const Case& c, std::vector<double> q, std::vector<double> keys, Result& res) {
  if (path_of(c) == pk::ScorePath::kTf32) {
    for (double& v : q) v = tf32_reference(v);
    for (double& v : keys) v = tf32_reference(v);
  }
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
  // An inexact input moves a dyadic value v by m / 2048 of its TF32 unit, |m| <= 450: less
  // than half a unit of v's binade and of the one below (v a power of two, moved down), so
  // rounding to nearest gives v back, while truncation would not for half of them. Exact in
  // fp32 (22 significant bits at most).
  std::uniform_int_distribution<int> nudge(-450, 450);
  auto draw = [&]() {
    const double v = static_cast<double>(dist(rng)) / c.levels;
    if (!c.inexact || v == 0) return v;
    const double unit = std::ldexp(1.0, std::ilogb(v) - 10);
    return v + nudge(rng) * unit / 2048;
  };
  const int width = 2 * c.half;
  std::vector<double> q(c.tokens * c.heads * width),
      keys(static_cast<size_t>(c.heads) * 2 * c.n_keys * c.half);
  for (auto& v : q) v = draw();
  for (auto& v : keys) v = draw();
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
  const pk::ScorePath path = path_of(c);
  const bool streamed =
      path != pk::ScorePath::kPlain && pk::query_mma_steps(path, c.half) == pk::kStreamedQuery;
  const char* path_name = path == pk::ScorePath::kTf32    ? (streamed ? "tf32 streamed" : "tf32")
                          : path == pk::ScorePath::kMma16 ? (streamed ? "mma streamed" : "mma")
                                                          : "plain";
  char name[200];
  std::snprintf(name, sizeof name,
                "%s tokens=%lld heads=%d n_keys=%d half=%d k=%d %s warps=%d%s%s%s",
                dtype_name(c.dtype), static_cast<long long>(c.tokens), c.heads, c.n_keys, c.half,
                c.k, path_name, c.nwarps, c.strided ? " strided" : "",
                c.misalign ? " misaligned" : "", c.inexact ? " inexact" : "");
  emu::report(bad == 0, name, std::to_string(bad) + " of " + std::to_string(want.scores.size()));
  return bad == 0;
}

// The emulated cvt.rna.tf32 against tf32_reference over random normal floats and exact
// ties (half a TF32 unit past a TF32 value, which rounds away from zero).
bool check_tf32_rounding() {
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits(0, 0xFFFFFFFFu);
  int bad = 0, n = 0;
  for (int i = 0; i < 20000; ++i) {
    uint32_t u = bits(rng);
    const uint32_t e = (u >> 23) & 0xFF;
    if (e == 0 || e == 0xFF) continue;           // subnormals keep fewer than 11 significant bits
    if (i % 2) u = (u & 0xFFFFE000u) | 0x1000u;  // a tie
    const float x = bit_cast<float>(u);
    const float want = static_cast<float>(tf32_reference(x));
    bad += bit_cast<uint32_t>(want) != memory_ext::cuda::to_tf32(x);
    ++n;
  }
  emu::report(bad == 0, "tf32 rounding (cvt.rna) of " + std::to_string(n) + " floats",
              std::to_string(bad) + " wrong");
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
      // fp32 on TF32 tensor cores (torch allows TF32), the bf16 grid again: 4 k-steps of 8
      // dims per 32-dim chunk, 16 k-steps in registers (half <= 128), streamed beyond
      {37, 2, 100, 48, 7, Dtype::kF32, true, 2, 32},         // partial CTA, partial tile and chunk
      {20, 1, 64, 40, 32, Dtype::kF32, true, 1, 32},         // half not a multiple of 32
      {17, 1, 130, 37, 5, Dtype::kF32, true, 1, 32},         // odd half: element-wise stage loads
      {16, 1, 64, 200, 64, Dtype::kF32, true, 1, 16},        // streamed, k == n_keys
      {9, 1, 70, 128, 3, Dtype::kF32, true, 1, 16},          // the largest half in registers
      {9, 1, 70, 136, 3, Dtype::kF32, true, 1, 16},          // half > 128: query streamed
      {40, 3, 200, 64, 16, Dtype::kF32, true, 4, 32, true},  // strided query, 4 warps
      {16, 1, 64, 32, 32, Dtype::kF32, true, 1, 1},          // many ties
      {16, 1, 512, 32, 256, Dtype::kF32, true, 1, 32},       // k = 256
      {12, 1, 96, 64, 9, Dtype::kF32, true, 1, 32, false, true},            // misaligned sub-keys
      {16, 1, 1024, 16, 32, Dtype::kF32, true, 1, 32},                      // n_keys >> k
      {7, 2, 64, 0, 10, Dtype::kF32, true, 1, 32},                          // half 0
      {130, 1, 150, 96, 20, Dtype::kF32, true, 8, 64, false, false, true},  // 8 warps
      {33, 2, 200, 256, 12, Dtype::kF32, true, 2, 64, true, false, true},   // strided, streamed
      {17, 1, 90, 44, 9, Dtype::kF32, true, 1, 64, false, true, true},      // misaligned
      // wider halves: the query streamed from shared memory (bf16/fp16 > 256, fp32 > 128)
      {9, 1, 70, 256, 3, Dtype::kBF16, true, 1, 16},                // the largest in registers
      {20, 1, 70, 264, 20, Dtype::kBF16, true, 1, 16},              // half > 256: streamed
      {16, 1, 300, 512, 32, Dtype::kF16, true, 2, 32},              // 32 k-steps, streamed
      {37, 2, 100, 520, 7, Dtype::kBF16, true, 2, 16},              // partial CTA and chunk
      {20, 1, 70, 700, 70, Dtype::kF16, true, 1, 8},                // half % 8 != 0, k == n_keys
      {16, 1, 64, 2048, 16, Dtype::kBF16, true, 1, 8},              // the widest streamed half
      {40, 3, 130, 600, 16, Dtype::kF16, true, 4, 16, true},        // strided query, 4 warps
      {12, 1, 96, 640, 9, Dtype::kBF16, true, 1, 16, false, true},  // misaligned sub-keys
      {9, 1, 70, 2056, 5, Dtype::kBF16, true, 1, 8},                // half > 2048: plain path
      {33, 2, 150, 1024, 12, Dtype::kF32, true, 2, 64, true, false, true},  // TF32, inexact
      {17, 1, 90, 301, 9, Dtype::kF32, true, 1, 16, false, true},           // TF32, odd half
      {9, 1, 70, 1100, 5, Dtype::kF32, true, 1, 8},  // TF32 half > 1024: plain path
  };
  int only = argc > 1 ? std::atoi(argv[1]) : -1;
  bool ok = only >= 0 || check_tf32_rounding();
  for (size_t i = 0; i < cases.size(); ++i) {
    if (only >= 0 && static_cast<int>(i) != only) continue;
    ok = run_case(cases[i], 1234 + i) && ok;
  }
  const int status = emu::summary();
  return ok ? status : 1;
}

// CPU emulation of the CUDA pk_topk kernel (csrc/cuda/pk_topk_kernel.cuh), for machines
// without a GPU. The kernel source is compiled unchanged as host C++; each CUDA thread is a
// host thread, and the primitives it calls are emulated:
//   warp_sync / block_sync    barriers over the 32 lanes / the CTA;
//   warp_ballot / warp_any    through a per-warp exchange array between two barriers;
//   mma_16816                 fragments gathered from the 32 lanes and multiplied using
//                             CuTe's SM80_16x8x16 (thread, value) layouts, an encoding of
//                             the fragment maps independent of the PTX tables the kernel
//                             follows;
//   cp_async_*                copies queued per thread and executed only when a
//                             cp_async_wait retires their group, so reading a stage before
//                             waiting for it reads stale (poisoned) bytes.
// Shared memory and the outputs start poisoned. Inputs are dyadic rationals small enough
// that every sum is exact in fp32 in any order, so results must equal a brute-force top-k
// over all n_keys^2 pairs bit for bit, ties (score desc, index asc) included.
//
// Build: g++ -std=c++20 -O2 -pthread -Icsrc/cuda tests/pk_topk_emulate.cpp
//        (add -fsanitize=thread to have missing warp/block barriers reported as races)
// Run:   ./a.out [case-number]   (exit status 0 when every case matches)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <algorithm>

#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "pk_topk_common.cuh"

namespace memory_ext::pk {

// A barrier made of atomics only (waiting on a raw futex). std::barrier waits through a
// mutex-protected pool shared by all barriers, which would show ThreadSanitizer ordering
// between warps that the GPU does not give.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void arrive_and_wait() {
    const int phase = phase_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      phase_.store(phase + 1, std::memory_order_release);
      syscall(SYS_futex, reinterpret_cast<int*>(&phase_), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
              nullptr, 0);
      return;
    }
    while (phase_.load(std::memory_order_acquire) == phase)
      syscall(SYS_futex, reinterpret_cast<int*>(&phase_), FUTEX_WAIT_PRIVATE, phase, nullptr,
              nullptr, 0);
  }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<int> phase_{0};
};
static_assert(sizeof(std::atomic<int>) == sizeof(int));

struct WarpCtx {
  Barrier bar{kWarp};
  uint32_t pred[kWarp];
  uint32_t a[kWarp][4];
  uint32_t b[kWarp][2];
};

struct PendingCopy {
  void* dst;
  const void* src;
  int bytes;
};

thread_local int t_lane = 0;
thread_local WarpCtx* t_warp = nullptr;
thread_local Barrier* t_block = nullptr;
thread_local std::vector<PendingCopy> t_open;
thread_local std::deque<std::vector<PendingCopy>> t_groups;
thread_local bool t_bf16_mma = true;

inline int lane_id() { return t_lane; }
inline void warp_sync() { t_warp->bar.arrive_and_wait(); }
inline void block_sync() { t_block->arrive_and_wait(); }
inline uint32_t warp_ballot(bool p) {
  t_warp->pred[t_lane] = p ? 1u : 0u;
  warp_sync();
  uint32_t m = 0;
  for (int i = 0; i < kWarp; ++i) m |= t_warp->pred[i] << i;
  warp_sync();
  return m;
}
inline bool warp_any(bool p) { return warp_ballot(p) != 0; }
inline int popc(uint32_t x) { return __builtin_popcount(x); }
inline uint32_t lanemask_lt() { return (1u << t_lane) - 1u; }

inline uint32_t lds_u32(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void sts_f2(float* p, float a, float b) {
  p[0] = a;
  p[1] = b;
}

inline float half_bits_to_float(uint16_t h) {
  const int sign = h >> 15, e = (h >> 10) & 0x1F, m = h & 0x3FF;
  float v;
  if (e == 0) {
    v = std::ldexp(static_cast<float>(m), -24);
  } else if (e == 31) {
    v = m ? NAN : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(m | 0x400), e - 25);
  }
  return sign ? -v : v;
}

inline float bits16_to_float(uint16_t v, bool bf16) {
  return bf16 ? bits_float(static_cast<uint32_t>(v) << 16) : half_bits_to_float(v);
}

template <bool kBf16>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  WarpCtx& w = *t_warp;
  for (int i = 0; i < 4; ++i) w.a[t_lane][i] = a[i];
  w.b[t_lane][0] = b0;
  w.b[t_lane][1] = b1;
  warp_sync();
  // CuTe: ALayout ((4,8),(2,2,2)):((32,1),(16,8,128)) over the column-major 16x16 (m, k);
  // BLayout ((4,8),(2,2)):((16,1),(8,64)) over the column-major 8x16 (n, k);
  // CLayout ((4,8),(2,2)):((32,1),(16,8)) over the column-major 16x8 (m, n); thread
  // t = t0 + 4 t1, value v = v0 + 2 v1 (+ 4 v2), two 16-bit values per register.
  auto value = [&](const uint32_t* regs, int v) -> float {
    return bits16_to_float(static_cast<uint16_t>(regs[v / 2] >> (16 * (v % 2))), kBf16);
  };
  auto A = [&](int m, int k) {
    for (int t = 0; t < kWarp; ++t)
      for (int v = 0; v < 8; ++v) {
        const int idx = 32 * (t % 4) + (t / 4) + 16 * (v % 2) + 8 * ((v / 2) % 2) + 128 * (v / 4);
        if (idx % 16 == m && idx / 16 == k) return value(w.a[t], v);
      }
    std::abort();
  };
  auto B = [&](int k, int n) {
    for (int t = 0; t < kWarp; ++t)
      for (int v = 0; v < 4; ++v) {
        const int idx = 16 * (t % 4) + (t / 4) + 8 * (v % 2) + 64 * (v / 2);
        if (idx % 8 == n && idx / 8 == k) return value(w.b[t], v);
      }
    std::abort();
  };
  for (int v = 0; v < 4; ++v) {
    const int idx = 32 * (t_lane % 4) + (t_lane / 4) + 16 * (v % 2) + 8 * (v / 2);
    const int m = idx % 16, n = idx / 16;
    float s = d[v];
    for (int k = 0; k < 16; ++k) s += A(m, k) * B(k, n);
    d[v] = s;
  }
  warp_sync();
}

// Copies run when their group is retired (late: exposes reads of a stage before its wait)
// or, with PK_EMU_EARLY_COPIES=1, at issue (early: exposes overwrites of a stage that
// another warp may still read, which ThreadSanitizer then reports).
inline bool early_copies() {
  static const bool early = std::getenv("PK_EMU_EARLY_COPIES") != nullptr &&
                            std::string(std::getenv("PK_EMU_EARLY_COPIES")) == "1";
  return early;
}

inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  if (early_copies()) {
    std::memcpy(dst, src, src_bytes);
    std::memset(static_cast<char*>(dst) + src_bytes, 0, 16 - src_bytes);
    return;
  }
  t_open.push_back({dst, src, src_bytes});
}
inline void cp_async_commit() {
  t_groups.push_back(std::move(t_open));
  t_open.clear();
}
template <int N>
inline void cp_async_wait() {
  while (static_cast<int>(t_groups.size()) > N) {
    for (const PendingCopy& c : t_groups.front()) {
      std::memcpy(c.dst, c.src, c.bytes);
      std::memset(static_cast<char*>(c.dst) + c.bytes, 0, 16 - c.bytes);
    }
    t_groups.pop_front();
  }
}

}  // namespace memory_ext::pk

#include "pk_topk_kernel.cuh"

namespace pk = memory_ext::pk;

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

uint16_t to_bf16_bits(float x) { return static_cast<uint16_t>(pk::float_bits(x) >> 16); }

uint16_t to_f16_bits(float x) {  // exact for the small dyadic values used here
  if (x == 0.f) return 0;
  const uint32_t f = pk::float_bits(x);
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

template <class In>
void run_blocks(const pk::Params& prm, const Case& c, int hk_max) {
  using S = typename In::Score;
  const int rows = prm.nwarps * pk::kRowsPerWarp;
  const int64_t blocks = (prm.tokens + rows - 1) / rows;
  std::vector<char> smem_store(prm.layout.total + 16);
  char* smem = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_store.data()) + 15) &
                                       ~uintptr_t{15});
  for (int h = 0; h < prm.heads; ++h) {
    for (int64_t bx = 0; bx < blocks; ++bx) {
      std::memset(smem, 0xFF, prm.layout.total);  // poison: NaN floats, maximal keys
      std::vector<std::unique_ptr<pk::WarpCtx>> warps;
      for (int w = 0; w < prm.nwarps; ++w) warps.push_back(std::make_unique<pk::WarpCtx>());
      pk::Barrier block_bar(prm.nwarps * pk::kWarp);
      std::vector<std::thread> threads;
      for (int tid = 0; tid < prm.nwarps * pk::kWarp; ++tid) {
        threads.emplace_back([&, tid] {
          pk::t_lane = tid % pk::kWarp;
          pk::t_warp = warps[tid / pk::kWarp].get();
          pk::t_block = &block_bar;
          if constexpr (std::is_same_v<In, pk::InBF16> || std::is_same_v<In, pk::InF16>) {
            if (c.tensor_cores) {
              constexpr bool bf = std::is_same_v<In, pk::InBF16>;
              if (hk_max == 16) {
                pk::mma_block<bf, 16>(prm, static_cast<int>(bx), h, tid, smem);
              } else {
                pk::mma_block<bf, 32>(prm, static_cast<int>(bx), h, tid, smem);
              }
            } else {
              pk::plain_block<In>(prm, static_cast<int>(bx), h, tid, smem);
            }
          } else {
            pk::plain_block<In>(prm, static_cast<int>(bx), h, tid, smem);
          }
          if (!pk::t_open.empty() || !pk::t_groups.empty()) {
            std::fprintf(stderr, "thread %d ended with async copies pending\n", tid);
            std::abort();
          }
        });
      }
      for (auto& t : threads) t.join();
    }
  }
  (void)sizeof(S);
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

  std::vector<S> scores(c.tokens * c.heads * c.k, pk::bits_float(0x7FC00000u));  // NaN poison
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
  prm.vector_keys = (c.half % 8 == 0) && (reinterpret_cast<uintptr_t>(prm.keys) % 16 == 0);
  prm.layout = pk::make_layout(c.tensor_cores, sizeof(S), sizeof(typename pk::KeyOf<S>::type),
                               c.nwarps, prm.kp, prm.k, prm.npairs);
  run_blocks<In>(prm, c, c.half <= 256 ? 16 : 32);
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
  std::printf("%s tokens=%lld heads=%d n_keys=%d half=%d k=%d %s warps=%d%s%s: %s\n",
              dtype_name(c.dtype), static_cast<long long>(c.tokens), c.heads, c.n_keys, c.half, c.k,
              c.tensor_cores ? "mma" : "plain", c.nwarps, c.strided ? " strided" : "",
              c.misalign ? " misaligned" : "", bad ? "MISMATCH" : "ok");
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
  return ok ? 0 : 1;
}

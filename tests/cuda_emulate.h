// CPU emulation of the CUDA subset our kernels use, for machines without a GPU. A test
// (tests/*_emulate.cpp) includes this header first, then the kernel headers of
// csrc/cuda/ unchanged, and launches the kernels with emu::launch: each CUDA thread is a
// host thread, the blocks of a grid run one after another, and the built-ins behave as
// follows:
//   threadIdx, blockIdx, blockDim, gridDim   per-thread values set by the launch;
//   __syncthreads, __syncwarp                barriers of the block / of the lanes named by
//                                            the mask (an aligned group of lanes); a
//                                            thread that never arrives is a deadlock,
//                                            reported by a watchdog;
//   __shfl_sync, __shfl_xor_sync,            an exchange through per-warp slots between two
//   __ballot_sync, __any_sync                barriers of exactly the caller's group; the
//                                            mask must name that group;
//   __shared__                               one static array per kernel instantiation
//                                            (blocks do not overlap in time);
//   dynamic shared memory                    one 16-byte aligned buffer per block, poisoned
//                                            (0xFF bytes: NaN floats, maximal keys);
//   __ldg, vector loads and stores           plain accesses, after checking their alignment
//                                            (MEMORY_EXT_CHECK_ALIGNED);
//   atomicMin, atomicMax                     std::atomic_ref;
//   bf16, fp16                               bit-exact round-to-nearest-even conversions;
//   mma_16816 (memory_ext/cuda_sm80.cuh)     fragments gathered from the 32 lanes and
//                                            multiplied through CuTe's SM80_16x8x16
//                                            (thread, value) layouts, an encoding of the
//                                            fragment maps independent of the PTX tables
//                                            the kernels follow;
//   mma_1688_tf32, to_tf32 (same header)     the same for CuTe's SM80_16x8x8 TF32 layouts;
//                                            operands must be TF32 values (rounded by
//                                            to_tf32: to nearest, ties away, as cvt.rna);
//   cp_async_* (same header)                 copies queued per thread and executed only
//                                            when a cp_async_wait retires their group, so
//                                            reading a stage before waiting for it reads
//                                            stale (poisoned) bytes; with
//                                            MEMORY_EXT_EMU_EARLY_COPIES=1 they run at
//                                            issue instead, which exposes overwrites of a
//                                            stage another warp may still read (a race
//                                            that ThreadSanitizer then reports).
// Any misuse (bad mask, misaligned load or copy, async copies left pending at exit)
// ends the process with a message and exit status 3.
//
// Build a test with: g++ -std=c++20 -O2 -pthread -fno-strict-aliasing -Icsrc/include
// -Icsrc/cuda -Itests tests/<family>_emulate.cpp (-fno-strict-aliasing: the kernels
// reinterpret shared memory as CUDA allows; add -fsanitize=thread to have missing
// barriers reported as races, or -fsanitize=address for out-of-bounds accesses).
#pragma once

#define MEMORY_EXT_EMULATE 1

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "memory_ext/host_device.h"  // acc_t, for the conversions at the end

// ---------------------------------------------------------------------------------------
// Qualifiers and types.

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)
#define MEMORY_EXT_DYNAMIC_SMEM(name) char* name = ::emu::dynamic_smem()

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};

thread_local dim3 threadIdx, blockIdx, gridDim, blockDim;

namespace emu {

[[noreturn]] inline void fail(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::vfprintf(stderr, fmt, args);
  va_end(args);
  std::fputc('\n', stderr);
  std::fflush(stdout);
  std::fflush(stderr);
  std::_Exit(3);
}

template <typename To, typename From>
To bits_as(const From& from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

}  // namespace emu

// ---------------------------------------------------------------------------------------
// Conversions and bit casts.

inline float __uint_as_float(unsigned u) { return emu::bits_as<float>(u); }
inline unsigned __float_as_uint(float f) { return emu::bits_as<unsigned>(f); }
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline float __bfloat162float(__nv_bfloat16 v) {
  return __uint_as_float(static_cast<unsigned>(v.bits) << 16);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned u = __float_as_uint(f);
  if (std::isnan(f)) return {static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
inline float __half2float(__half h) {
  const int sign = h.bits >> 15, e = (h.bits >> 10) & 0x1f, m = h.bits & 0x3ff;
  float v;
  if (e == 0)
    v = std::ldexp(static_cast<float>(m), -24);
  else if (e == 31)
    v = m ? NAN : INFINITY;
  else
    v = std::ldexp(static_cast<float>(m | 0x400), e - 25);
  return sign ? -v : v;
}
inline __half __float2half_rn(float f) {
  const unsigned x = __float_as_uint(f);
  const unsigned sign = (x >> 16) & 0x8000u;
  const int e = static_cast<int>((x >> 23) & 0xff);
  unsigned mant = x & 0x7fffffu;
  if (e == 0xff) return {static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0u))};
  const int he = e - 127 + 15;
  if (he >= 31) return {static_cast<uint16_t>(sign | 0x7c00u)};
  if (he <= 0) {  // subnormal half
    if (he < -10) return {static_cast<uint16_t>(sign)};
    mant |= 0x800000u;
    const int shift = 14 - he;
    unsigned h = mant >> shift;
    const unsigned rem = mant & ((1u << shift) - 1u), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (h & 1u))) ++h;
    return {static_cast<uint16_t>(sign | h)};
  }
  unsigned h = (static_cast<unsigned>(he) << 10) | (mant >> 13);
  const unsigned rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
  return {static_cast<uint16_t>(sign | h)};
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }

// ---------------------------------------------------------------------------------------
// Memory.

namespace emu {

// The GPU faults on a misaligned vector access (and reads the wrong words of shared
// memory); so does the emulation.
inline void check_aligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    fail("%s: %zu-byte access at %p, which is not %zu-byte aligned", what, bytes, p, bytes);
}

// n elements whose first one sits `offset` bytes past a 16-byte boundary, as in a tensor
// view with a storage offset: the inputs of cases that check the step-down to narrower
// vectors. The allocation ends with the last element, so AddressSanitizer still reports
// an overrun.
template <typename T>
class OffsetBuffer {
 public:
  OffsetBuffer(int64_t n, int offset) : bytes_(offset + n * sizeof(T)), offset_(offset), n_(n) {
    if (reinterpret_cast<uintptr_t>(bytes_.data()) % 16 != 0) fail("OffsetBuffer: unaligned base");
  }
  T* data() { return n_ == 0 ? nullptr : reinterpret_cast<T*>(bytes_.data() + offset_); }
  T& operator[](int64_t i) { return data()[i]; }
  int64_t size() const { return n_; }
  // 0xFF bytes (NaN, -1), so an element a kernel fails to write mismatches.
  void poison() { std::memset(bytes_.data() + offset_, 0xff, n_ * sizeof(T)); }

 private:
  std::vector<char> bytes_;
  int offset_;
  int64_t n_;
};

}  // namespace emu

// Every vector access of memory_ext/cuda_device.cuh (loads, stores, shared-memory words)
// reports its address and width here.
#define MEMORY_EXT_CHECK_ALIGNED(ptr, bytes, what) \
  ::emu::check_aligned(static_cast<const void*>(ptr), (bytes), (what))

template <typename T>
inline T __ldg(const T* p) {
  emu::check_aligned(p, alignof(T), "__ldg");
  return *p;
}

inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> a(*p);
  unsigned long long old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
inline long long atomicMax(long long* p, long long v) {
  std::atomic_ref<long long> a(*p);
  long long old = a.load();
  while (v > old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}

// ---------------------------------------------------------------------------------------
// Threads, barriers and the exchanges between lanes.

namespace emu {

// Barrier completions so far; the watchdog reports a deadlock (some thread never arrives
// at a barrier that others wait on) when it stops moving while threads wait.
inline std::atomic<uint64_t> g_progress{0};
inline std::atomic<int> g_waiting{0};

// A barrier of n threads on atomics (futex waits, no mutex: far faster than a condition
// variable when hundreds of threads share two cores, and no ordering between unrelated
// barriers that ThreadSanitizer would take for the GPU's).
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    const uint32_t gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.store(gen + 1, std::memory_order_release);
      gen_.notify_all();
      g_progress.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    g_waiting.fetch_add(1);
    while (gen_.load(std::memory_order_acquire) == gen) gen_.wait(gen, std::memory_order_acquire);
    g_waiting.fetch_sub(1);
  }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<uint32_t> gen_{0};
};

inline void start_watchdog() {
  static std::once_flag once;
  std::call_once(once, [] {
    std::thread([] {
      uint64_t last = g_progress.load();
      int still = 0;
      for (;;) {
        std::this_thread::sleep_for(std::chrono::seconds(1));
        const uint64_t now = g_progress.load();
        still = (now == last && g_waiting.load() > 0) ? still + 1 : 0;
        last = now;
        if (still >= 60)
          fail("DEADLOCK: %d threads wait at barriers that never complete", g_waiting.load());
      }
    }).detach();
  });
}

constexpr int kLanes = 32;

struct WarpCtx {
  uint64_t slot[kLanes];
  uint32_t mma_a[kLanes][4], mma_b[kLanes][2];
  std::unique_ptr<Barrier> group[6][kLanes];  // [log2 width][group]: lanes that sync together
  WarpCtx() {
    for (int lw = 0; lw <= 5; ++lw)
      for (int g = 0; g < (kLanes >> lw); ++g) group[lw][g] = std::make_unique<Barrier>(1 << lw);
  }
};

struct BlockCtx {
  Barrier block;
  std::vector<WarpCtx> warps;
  char* dynamic_smem;
  BlockCtx(int threads, char* smem) : block(threads), warps(threads / kLanes), dynamic_smem(smem) {}
};

inline thread_local BlockCtx* t_block = nullptr;

inline char* dynamic_smem() { return t_block->dynamic_smem; }
inline int lane() { return static_cast<int>(threadIdx.x % kLanes); }
inline WarpCtx& warp() { return t_block->warps[threadIdx.x / kLanes]; }

inline int log2_of(int w) {
  int l = 0;
  while ((1 << l) < w) ++l;
  return l;
}

// The barrier of the caller's aligned group of `width` lanes, after checking that `mask`
// names exactly that group.
inline Barrier& group_barrier(unsigned mask, int width, const char* what) {
  const int base = lane() & ~(width - 1);
  if (width < 1 || width > kLanes || (width & (width - 1)) != 0) fail("%s: width %d", what, width);
  const unsigned expect = width == kLanes ? 0xffffffffu : ((1u << width) - 1u) << base;
  if (mask != expect)
    fail("%s: mask %08x is not the %d-lane group of lane %d (%08x)", what, mask, width, lane(),
         expect);
  return *warp().group[log2_of(width)][lane() / width];
}

// The width of the group a mask names: its number of lanes.
inline int mask_width(unsigned mask) { return mask == 0xffffffffu ? kLanes : __popc(mask); }

// Every lane of the group publishes v; returns the value lane `src` published.
template <typename T>
T exchange(unsigned mask, T v, int width, int src, const char* what) {
  static_assert(sizeof(T) <= 8, "one shuffle moves at most 8 bytes");
  Barrier& b = group_barrier(mask, width, what);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  WarpCtx& w = warp();
  w.slot[lane()] = bits;
  b.wait();
  const uint64_t got = w.slot[src];
  b.wait();
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

// The OR over the group's lanes of (predicate << lane).
inline unsigned vote(unsigned mask, bool p, const char* what) {
  const int width = mask_width(mask);
  Barrier& b = group_barrier(mask, width, what);
  WarpCtx& w = warp();
  w.slot[lane()] = p ? 1u : 0u;
  b.wait();
  const int base = lane() & ~(width - 1);
  unsigned bits = 0;
  for (int i = base; i < base + width; ++i) bits |= static_cast<unsigned>(w.slot[i]) << i;
  b.wait();
  return bits;
}

}  // namespace emu

inline void __syncthreads() { emu::t_block->block.wait(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  emu::group_barrier(mask, emu::mask_width(mask), "__syncwarp").wait();
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return emu::exchange(mask, v, width, (emu::lane() & ~(width - 1)) + (src & (width - 1)),
                       "__shfl_sync");
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = emu::lane();
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return emu::exchange(mask, v, width, src, "__shfl_xor_sync");
}

inline unsigned __ballot_sync(unsigned mask, bool p) { return emu::vote(mask, p, "__ballot_sync"); }
inline int __any_sync(unsigned mask, bool p) { return emu::vote(mask, p, "__any_sync") != 0; }

// ---------------------------------------------------------------------------------------
// sm_80 tensor-core and async-copy primitives (memory_ext/cuda_sm80.cuh on the GPU).

namespace emu {

inline float bits16_to_float(uint16_t v, bool bf16) {
  return bf16 ? __bfloat162float(__nv_bfloat16{v}) : __half2float(__half{v});
}

struct PendingCopy {
  void* dst;
  const void* src;
  int bytes;
};
inline thread_local std::vector<PendingCopy> t_open_copies;
inline thread_local std::deque<std::vector<PendingCopy>> t_copy_groups;

inline bool early_copies() {
  static const bool early = [] {
    const char* v = std::getenv("MEMORY_EXT_EMU_EARLY_COPIES");
    return v != nullptr && std::string(v) == "1";
  }();
  return early;
}

inline void run_copy(const PendingCopy& c) {
  std::memcpy(c.dst, c.src, c.bytes);
  std::memset(static_cast<char*>(c.dst) + c.bytes, 0, 16 - c.bytes);
}

}  // namespace emu

namespace memory_ext::cuda {

// The lane's four float32 results of an m16n8kK mma: CuTe's CLayout
// ((4,8),(2,2)):((32,1),(16,8)) over the column-major 16x8 (m, n), each d[v] plus the
// products A(m, k) * B(k, n) added in float32 in k order.
template <int K, typename FA, typename FB>
inline void accumulate_mma_tile(float (&d)[4], int lane, FA&& A, FB&& B) {
  for (int v = 0; v < 4; ++v) {
    const int idx = 32 * (lane % 4) + (lane / 4) + 16 * (v % 2) + 8 * (v / 2);
    const int m = idx % 16, n = idx / 16;
    float s = d[v];
    for (int k = 0; k < K; ++k) s += A(m, k) * B(k, n);
    d[v] = s;
  }
}

// Puts the lane's A and B registers where the other lanes of the warp can read them (after
// the barrier) and returns the warp's shared slots.
inline emu::WarpCtx& share_mma_operands(int lane, const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  emu::WarpCtx& w = emu::warp();
  for (int i = 0; i < 4; ++i) w.mma_a[lane][i] = a[i];
  w.mma_b[lane][0] = b0;
  w.mma_b[lane][1] = b1;
  __syncwarp();
  return w;
}

template <bool kBf16>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int lane = emu::lane();
  emu::WarpCtx& w = share_mma_operands(lane, a, b0, b1);
  // CuTe: ALayout ((4,8),(2,2,2)):((32,1),(16,8,128)) over the column-major 16x16 (m, k);
  // BLayout ((4,8),(2,2)):((16,1),(8,64)) over the column-major 8x16 (n, k);
  // CLayout ((4,8),(2,2)):((32,1),(16,8)) over the column-major 16x8 (m, n); thread
  // t = t0 + 4 t1, value v = v0 + 2 v1 (+ 4 v2), two 16-bit values per register.
  auto value = [&](const uint32_t* regs, int v) -> float {
    return emu::bits16_to_float(static_cast<uint16_t>(regs[v / 2] >> (16 * (v % 2))), kBf16);
  };
  auto A = [&](int m, int k) {
    for (int t = 0; t < emu::kLanes; ++t)
      for (int v = 0; v < 8; ++v) {
        const int idx = 32 * (t % 4) + (t / 4) + 16 * (v % 2) + 8 * ((v / 2) % 2) + 128 * (v / 4);
        if (idx % 16 == m && idx / 16 == k) return value(w.mma_a[t], v);
      }
    std::abort();
  };
  auto B = [&](int k, int n) {
    for (int t = 0; t < emu::kLanes; ++t)
      for (int v = 0; v < 4; ++v) {
        const int idx = 16 * (t % 4) + (t / 4) + 8 * (v % 2) + 64 * (v / 2);
        if (idx % 8 == n && idx / 8 == k) return value(w.mma_b[t], v);
      }
    std::abort();
  };
  accumulate_mma_tile<16>(d, lane, A, B);
  __syncwarp();
}

inline void cp_async_16(void* smem_dst, const void* global_src, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(smem_dst) % 16 != 0 ||
      (src_bytes > 0 && reinterpret_cast<uintptr_t>(global_src) % 16 != 0))
    emu::fail("cp_async_16: %p <- %p is not 16-byte aligned", smem_dst, global_src);
  const emu::PendingCopy c{smem_dst, global_src, src_bytes};
  if (emu::early_copies())
    emu::run_copy(c);
  else
    emu::t_open_copies.push_back(c);
}

inline void cp_async_commit() {
  emu::t_copy_groups.push_back(std::move(emu::t_open_copies));
  emu::t_open_copies.clear();
}

template <int N>
inline void cp_async_wait() {
  while (static_cast<int>(emu::t_copy_groups.size()) > N) {
    for (const emu::PendingCopy& c : emu::t_copy_groups.front()) emu::run_copy(c);
    emu::t_copy_groups.pop_front();
  }
}

}  // namespace memory_ext::cuda

// ---------------------------------------------------------------------------------------
// TF32 tensor cores (mma_1688_tf32 and to_tf32 of memory_ext/cuda_sm80.cuh on the GPU).

namespace emu {

// Rounds float bits to TF32 as cvt.rna.tf32.f32 does: to nearest, ties away from zero, 10
// mantissa bits kept (adding half a unit to the magnitude bits and truncating rounds ties
// up in magnitude; a carry into the exponent is right). Inf and NaN pass unchanged.
inline uint32_t tf32_round_bits(uint32_t u) {
  if ((u & 0x7F800000u) == 0x7F800000u) return u;
  return (u + 0x1000u) & 0xFFFFE000u;
}

}  // namespace emu

namespace memory_ext::cuda {

inline uint32_t to_tf32(float x) { return emu::tf32_round_bits(__float_as_uint(x)); }

// One m16n8k8 TF32 mma over the warp, fragments gathered from the 32 lanes like
// mma_16816. An operand with any of its low 13 bits set is a kernel that forgot to_tf32:
// the GPU's result would then depend on what the tensor core does with those bits.
inline void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int lane = emu::lane();
  emu::WarpCtx& w = share_mma_operands(lane, a, b0, b1);
  // CuTe SM80_16x8x8_F32TF32TF32F32_TN: ALayout ((4,8),(2,2)):((16,1),(8,64)) over the
  // column-major 16x8 (m, k); BLayout ((4,8),2):((8,1),32) over the column-major 8x8 (n, k);
  // CLayout as for m16n8k16; thread t = t0 + 4 t1, value v = v0 + 2 v1, one value per
  // register.
  auto value = [](uint32_t bits) -> float {
    if ((bits & 0x1FFFu) != 0 && (bits & 0x7F800000u) != 0x7F800000u)
      emu::fail("mma_1688_tf32: operand %08x is not a TF32 value (low 13 bits set)", bits);
    return __uint_as_float(bits);
  };
  auto A = [&](int m, int k) {
    for (int t = 0; t < emu::kLanes; ++t)
      for (int v = 0; v < 4; ++v) {
        const int idx = 16 * (t % 4) + (t / 4) + 8 * (v % 2) + 64 * (v / 2);
        if (idx % 16 == m && idx / 16 == k) return value(w.mma_a[t][v]);
      }
    std::abort();
  };
  auto B = [&](int k, int n) {
    for (int t = 0; t < emu::kLanes; ++t)
      for (int v = 0; v < 2; ++v) {
        const int idx = 8 * (t % 4) + (t / 4) + 32 * v;
        if (idx % 8 == n && idx / 8 == k) return value(w.mma_b[t][v]);
      }
    std::abort();
  };
  accumulate_mma_tile<8>(d, lane, A, B);
  __syncwarp();
}

}  // namespace memory_ext::cuda

// ---------------------------------------------------------------------------------------
// Launches and results.

namespace emu {

// kernel<<<grid, block, smem_bytes>>>(args...): one host thread per CUDA thread, blocks
// in turn, each with fresh (poisoned) dynamic shared memory.
template <typename... P, typename... A>
void launch(dim3 grid, unsigned block, size_t smem_bytes, void (*kernel)(P...), A... args) {
  if (block % kLanes != 0 || block == 0) fail("launch: block of %u threads", block);
  start_watchdog();
  std::vector<char> smem_store(smem_bytes + 16);
  char* smem = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_store.data()) + 15) &
                                       ~uintptr_t{15});
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::memset(smem, 0xFF, smem_bytes);
      BlockCtx ctx(static_cast<int>(block), smem);
      std::vector<std::thread> threads;
      threads.reserve(block);
      for (unsigned t = 0; t < block; ++t)
        threads.emplace_back([&, t] {
          threadIdx = {t, 1, 1};
          blockIdx = {bx, by, 1};
          gridDim = grid;
          blockDim = {block, 1, 1};
          t_block = &ctx;
          kernel(args...);
          if (!t_open_copies.empty() || !t_copy_groups.empty())
            fail("thread %u of block (%u, %u) ended with async copies pending", t, bx, by);
        });
      for (auto& th : threads) th.join();
    }
}

template <typename... P, typename... A>
void launch(unsigned grid, unsigned block, void (*kernel)(P...), A... args) {
  launch(dim3(grid), block, 0, kernel, args...);
}

// Short names of the value types, for case names.
template <typename T>
const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "f32";
  if constexpr (std::is_same_v<T, double>) return "f64";
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return "bf16";
  if constexpr (std::is_same_v<T, __half>) return "f16";
  return "?";
}

// Every output starts as NaN / -1 bytes, so an element a kernel fails to write mismatches.
template <typename T>
void poison(std::vector<T>& v) {
  if (!v.empty()) std::memset(static_cast<void*>(v.data()), 0xff, v.size() * sizeof(T));
}

inline int g_cases = 0, g_mismatches = 0;

// One line per case, "<name>: ok (<seconds>)" or "<name>: MISMATCH <detail>".
inline void report(bool ok, const std::string& name, const std::string& detail) {
  static auto last = std::chrono::steady_clock::now();
  ++g_cases;
  const auto now = std::chrono::steady_clock::now();
  const double secs = std::chrono::duration<double>(now - last).count();
  last = now;
  if (ok) {
    std::printf("%s: ok (%.2f s)\n", name.c_str(), secs);
  } else {
    ++g_mismatches;
    std::printf("%s: MISMATCH %s\n", name.c_str(), detail.c_str());
  }
  std::fflush(stdout);
}

// The exit status of a test: 0 when every case matched.
inline int summary() {
  std::printf("%d cases, %d mismatches\n", g_cases, g_mismatches);
  return g_mismatches == 0 ? 0 : 1;
}

// Conversions between float and the emulated parameter types, for references written in
// the kernels' own arithmetic.
template <typename T>
T from_float(float f) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __float2bfloat16_rn(f);
  else if constexpr (std::is_same_v<T, __half>)
    return __float2half_rn(f);
  else
    return static_cast<T>(f);
}

// The one rounding of a float result of the result to the parameter type.
template <typename T>
T narrow(memory_ext::acc_t<T> s) {
  if constexpr (std::is_same_v<T, double>)
    return s;
  else
    return from_float<T>(s);
}

template <typename T>
memory_ext::acc_t<T> widen(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __bfloat162float(v);
  else if constexpr (std::is_same_v<T, __half>)
    return __half2float(v);
  else
    return v;
}

}  // namespace emu

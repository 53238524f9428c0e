// CUDA kernel of torch.ops.memory.pk_topk: half scores on tensor cores (bf16/fp16, and fp32
// as TF32 where torch's float32 matmul precision allows it) or with FMAs (fp32/fp64), a
// running top-k per (token, head, half) in shared memory, the exact rank-product combine,
// and nothing but the k results written to device memory. The algorithm is in
// pk_topk_kernel.cuh; this file picks a kernel and a launch shape.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <utility>

#include "memory_ext/checks.h"
#include "memory_ext/launch_rules.h"
#include "memory_ext/pk_topk_by_sorting.h"
#include "memory_ext/prologues.h"
#include "pk_topk_kernel.cuh"

namespace memory_ext {
namespace {

namespace pk = cuda::pk;
using cuda::kWarpSize;
using pk::Params;
using pk::pk_topk_mma_kernel;
using pk::pk_topk_plain_kernel;

using KernelFn = void (*)(Params);

struct KernelChoice {
  KernelFn fn;
  bool tensor_cores;
  int score_bytes;
  int key_bytes;
  int elem_bytes;       // of the inputs: a 16-byte copy moves 16 / elem_bytes of them
  int query_row_words;  // > 0: the query half is streamed from shared memory

  pk::SmemLayout layout(const Params& prm, int nwarps) const {
    return pk::make_layout(tensor_cores, score_bytes, key_bytes, nwarps, prm.kp, prm.k, prm.npairs,
                           query_row_words);
  }
};

pk::InputKind input_kind(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16:
      return pk::InputKind::kBF16;
    case at::kHalf:
      return pk::InputKind::kF16;
    case at::kFloat:
      return pk::InputKind::kF32;
    case at::kDouble:
      return pk::InputKind::kF64;
    default:
      TORCH_CHECK(false, "memory.pk_topk: unsupported dtype ", dtype);
  }
}

template <class In>
KernelChoice mma_kernel(pk::ScorePath path, int64_t half) {
  const int steps = pk::query_mma_steps(path, half);
  const int elem = sizeof(typename In::Raw);
  const KernelFn fn =
      steps == 16 ? pk_topk_mma_kernel<In, 16> : pk_topk_mma_kernel<In, pk::kStreamedQuery>;
  const int row_words =
      steps == pk::kStreamedQuery ? pk::streamed_query_row_words(static_cast<int>(half), elem) : 0;
  return {fn, true, sizeof(float), sizeof(pk::KeyF), elem, row_words};
}

template <class In>
KernelChoice plain_kernel() {
  using S = typename In::Score;
  return {pk_topk_plain_kernel<In>, false, sizeof(S), sizeof(typename pk::KeyOf<S>::type),
          sizeof(typename In::Raw), 0};
}

// The kernel for the dtype, the GPU and torch's float32 matmul precision
// (pk::choose_score_path); plain_only: the FMA kernel whatever the path.
KernelChoice pick_kernel(at::ScalarType dtype, int64_t half, int cc_major, bool allow_tf32,
                         bool plain_only) {
  const pk::ScorePath path = pk::choose_score_path(input_kind(dtype), half, cc_major, allow_tf32);
  const bool tc = path != pk::ScorePath::kPlain && !plain_only;
  switch (dtype) {
    case at::kBFloat16:
      return tc ? mma_kernel<pk::InBF16>(path, half) : plain_kernel<pk::InBF16>();
    case at::kHalf:
      return tc ? mma_kernel<pk::InF16>(path, half) : plain_kernel<pk::InF16>();
    case at::kFloat:
      return tc ? mma_kernel<pk::InF32>(path, half) : plain_kernel<pk::InF32>();
    default:
      return plain_kernel<pk::InF64>();
  }
}

// TF32 for float32 inputs follows torch's rule for float32 matmuls:
// torch.set_float32_matmul_precision("high" or "medium") allows it; the default "highest"
// keeps the exact FMA path.
bool float32_matmul_allows_tf32() {
  return at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
}

int device_attribute(cudaDeviceAttr attr, int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
  return v;
}

struct DeviceLimits {
  int cc_major;
  int sms;
  int optin;  // the most dynamic shared memory a block may opt in to
};

// CTAs of 1, 2, 4 and 8 warps one SM holds for one kernel and k (0: that size does not
// fit).
struct Residency {
  int blocks_per_sm[4];
};

// The launch facts of each device and of each (device, kernel, k), measured on first use
// and kept for the process. Besides sparing a dozen driver calls per call, it raises each
// kernel's dynamic shared-memory limit once per device, to the opt-in maximum, before any
// launch: a limit set per call just before the launch could be lowered by another host
// thread in between.
class LaunchCache {
 public:
  DeviceLimits device(int device) {
    const std::lock_guard<std::mutex> lock(mu_);
    return device_locked(device);
  }

  Residency residency(int device, const KernelChoice& kc, const Params& prm) {
    const std::lock_guard<std::mutex> lock(mu_);
    const auto key =
        std::make_tuple(device, reinterpret_cast<const void*>(kc.fn), prm.k, kc.query_row_words);
    const auto found = residency_.find(key);
    if (found != residency_.end()) return found->second;
    const DeviceLimits lim = device_locked(device);
    const auto fn_on_device = std::make_pair(device, reinterpret_cast<const void*>(kc.fn));
    if (opted_in_.count(fn_on_device) == 0) {
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kc.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, lim.optin));
      opted_in_.insert(fn_on_device);
    }
    Residency r{{0, 0, 0, 0}};
    for (int i = 0, nw = 1; nw <= pk::kMaxWarps; ++i, nw *= 2) {
      const pk::SmemLayout lay = kc.layout(prm, nw);
      if (lay.total > lim.optin) continue;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&r.blocks_per_sm[i], kc.fn,
                                                                   nw * kWarpSize, lay.total));
    }
    residency_.emplace(key, r);
    return r;
  }

 private:
  DeviceLimits device_locked(int device) {
    const auto found = devices_.find(device);
    if (found != devices_.end()) return found->second;
    const DeviceLimits lim{device_attribute(cudaDevAttrComputeCapabilityMajor, device),
                           device_attribute(cudaDevAttrMultiProcessorCount, device),
                           device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device)};
    devices_.emplace(device, lim);
    return lim;
  }

  std::mutex mu_;
  std::map<int, DeviceLimits> devices_;
  std::set<std::pair<int, const void*>> opted_in_;
  // (device, kernel, k, streamed query row words): what the layouts depend on
  std::map<std::tuple<int, const void*, int, int>, Residency> residency_;
};

LaunchCache& launch_cache() {
  static LaunchCache cache;
  return cache;
}

// Warps per CTA: pk::choose_warps over the cached residency of each size; 0 when none
// fits. The environment variable MEMORY_EXT_PK_TOPK_WARPS (1, 2, 4 or 8) forces a size
// where it fits, for tuning runs.
int pick_warps(const KernelChoice& kc, const Params& prm, int device, const DeviceLimits& lim) {
  const Residency r = launch_cache().residency(device, kc, prm);
  const char* env = std::getenv("MEMORY_EXT_PK_TOPK_WARPS");
  const int forced = env != nullptr ? std::atoi(env) : 0;
  return pk::choose_warps(r.blocks_per_sm, lim.sms, prm.tokens, prm.heads, forced);
}

std::tuple<at::Tensor, at::Tensor> pk_topk_cuda(const at::Tensor& query, const at::Tensor& keys,
                                                int64_t k) {
  check_pk_topk_args(query, keys, k);
  TORCH_CHECK(query.is_cuda(), "memory.pk_topk: expected CUDA tensors, got ", query.device());
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t tokens = query.size(0), heads = query.size(1);
  const int64_t n_keys = keys.size(2), half = keys.size(3);
  auto [scores, indices] = pk_topk_outputs(query, k);
  if (tokens == 0 || heads == 0) return {scores, indices};

  // What the fused kernels cannot take goes to the sorting path (same contract, ATen ops):
  // combined indices i * n_keys + j are 32-bit inside the kernels, heads are a grid
  // dimension, and shared memory bounds k and the token count the grid (both below).
  if (n_keys > 65536 || heads > 65535 || half > (int64_t{1} << 24))
    return pk_topk_by_sorting(query, keys, k);

  const auto keys_c = keys.contiguous();
  const int device = query.get_device();
  Params prm{};
  prm.query = query.const_data_ptr();
  prm.q_stride_t = query.stride(0);
  prm.q_stride_h = query.stride(1);
  prm.q_stride_d = query.stride(2);
  prm.keys = keys_c.const_data_ptr();
  prm.scores = scores.mutable_data_ptr();
  prm.indices = indices.mutable_data_ptr<int64_t>();
  prm.tokens = tokens;
  prm.heads = static_cast<int>(heads);
  prm.n_keys = static_cast<int>(n_keys);
  prm.half = static_cast<int>(half);
  prm.k = static_cast<int>(k);
  prm.kp = pk::next_pow2(prm.k);
  prm.npairs = pk::pair_count(prm.k);

  const DeviceLimits lim = launch_cache().device(device);
  const bool allow_tf32 = float32_matmul_allows_tf32();
  KernelChoice kc = pick_kernel(query.scalar_type(), half, lim.cc_major, allow_tf32, false);
  prm.nwarps = pick_warps(kc, prm, device, lim);
  if (prm.nwarps == 0 && kc.query_row_words > 0) {
    // A streamed query half and a large k together can outgrow shared memory, where the
    // FMA kernel, which keeps no query there, still fits.
    kc = pick_kernel(query.scalar_type(), half, lim.cc_major, allow_tf32, true);
    prm.nwarps = pick_warps(kc, prm, device, lim);
  }
  // k too large for the shared memory of any CTA size.
  if (prm.nwarps == 0) return pk_topk_by_sorting(query, keys, k);
  // 16-byte copies need 16-byte aligned sub-key rows of whole 16-byte pieces.
  prm.vector_keys = cuda::use_vector_path(half, 16 / kc.elem_bytes, {prm.keys});
  prm.layout = kc.layout(prm, prm.nwarps);

  const int64_t rows = int64_t{prm.nwarps} * pk::kRowsPerWarp;
  const int64_t blocks = (tokens + rows - 1) / rows;
  if (blocks > INT_MAX) return pk_topk_by_sorting(query, keys, k);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(heads));
  const dim3 block(static_cast<unsigned>(prm.nwarps * kWarpSize));
  kc.fn<<<grid, block, prm.layout.total, c10::cuda::getCurrentCUDAStream()>>>(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {scores, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(memory, CUDA, m) { m.impl("pk_topk", &pk_topk_cuda); }

}  // namespace memory_ext

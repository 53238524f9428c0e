// CUDA kernel of torch.ops.memory.pk_topk: half scores on tensor cores (bf16/fp16) or with
// FMAs (fp32/fp64), a running top-k per (token, head, half) in shared memory, the exact
// rank-product combine, and nothing but the k results written to device memory. The
// algorithm is in pk_topk_kernel.cuh; this file picks a kernel and a launch shape.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <cstdlib>

#include "memory_ext/checks.h"
#include "memory_ext/launch_rules.h"
#include "memory_ext/prologues.h"
#include "pk_topk_kernel.cuh"

namespace memory_ext {
namespace {

namespace pk = cuda::pk;
using cuda::kWarpSize;
using pk::Params;
using pk::pk_topk_mma_kernel;
using pk::pk_topk_plain_kernel;

struct KernelChoice {
  void (*fn)(Params);
  bool tensor_cores;
  int score_bytes;
  int key_bytes;
};

// The kernel for the dtype and the GPU (pk::use_tensor_cores).
KernelChoice pick_kernel(at::ScalarType dtype, int64_t half, int cc_major) {
  const bool tc =
      pk::use_tensor_cores(dtype == at::kBFloat16 || dtype == at::kHalf, half, cc_major);
  const bool k16 = pk::query_k16_steps(half) == 16;
  const int f = sizeof(float), kf = sizeof(pk::KeyF);
  switch (dtype) {
    case at::kBFloat16:
      if (tc)
        return {k16 ? pk_topk_mma_kernel<true, 16> : pk_topk_mma_kernel<true, 32>, true, f, kf};
      return {pk_topk_plain_kernel<pk::InBF16>, false, f, kf};
    case at::kHalf:
      if (tc)
        return {k16 ? pk_topk_mma_kernel<false, 16> : pk_topk_mma_kernel<false, 32>, true, f, kf};
      return {pk_topk_plain_kernel<pk::InF16>, false, f, kf};
    case at::kFloat:
      return {pk_topk_plain_kernel<pk::InF32>, false, f, kf};
    case at::kDouble:
      return {pk_topk_plain_kernel<pk::InF64>, false, static_cast<int>(sizeof(double)),
              static_cast<int>(sizeof(pk::KeyD))};
    default:
      TORCH_CHECK(false, "memory.pk_topk: unsupported dtype ", dtype);
  }
}

int device_attribute(cudaDeviceAttr attr, int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
  return v;
}

// Warps per CTA: the residency of each size from the occupancy calculator, then
// pk::choose_warps. The environment variable MEMORY_EXT_PK_TOPK_WARPS (1, 2, 4 or 8)
// forces a size where it fits, for tuning runs.
int pick_warps(const KernelChoice& kc, Params& prm, int device) {
  const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const char* env = std::getenv("MEMORY_EXT_PK_TOPK_WARPS");
  const int forced = env != nullptr ? std::atoi(env) : 0;
  int blocks_per_sm[4] = {0, 0, 0, 0};
  int smallest_need = INT_MAX;
  for (int i = 0, nw = 1; nw <= pk::kMaxWarps; ++i, nw *= 2) {
    const pk::SmemLayout lay = pk::make_layout(kc.tensor_cores, kc.score_bytes, kc.key_bytes, nw,
                                               prm.kp, prm.k, prm.npairs);
    smallest_need = std::min(smallest_need, lay.total);
    if (lay.total > optin) continue;
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kc.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, lay.total));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm[i], kc.fn,
                                                                 nw * kWarpSize, lay.total));
  }
  const int best = pk::choose_warps(blocks_per_sm, sms, prm.tokens, prm.heads, forced);
  TORCH_CHECK(best > 0, "memory.pk_topk: k = ", prm.k, " needs ", smallest_need,
              " bytes of shared memory per block, more than this GPU offers (", optin, ")");
  return best;
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

  // Combined indices i * n_keys + j are kept in 32 bits inside the kernel.
  TORCH_CHECK(n_keys <= 65536, "memory.pk_topk: the CUDA kernel supports n_keys <= 65536, got ",
              n_keys);
  TORCH_CHECK(heads <= 65535, "memory.pk_topk: the CUDA kernel supports heads <= 65535, got ",
              heads);
  TORCH_CHECK(half <= (int64_t{1} << 24), "memory.pk_topk: half width too large, got ", half);

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
  // 16-byte copies need 16-byte aligned sub-key rows.
  prm.vector_keys = cuda::use_vector_path(half, 8, {prm.keys});

  const KernelChoice kc = pick_kernel(query.scalar_type(), half,
                                      device_attribute(cudaDevAttrComputeCapabilityMajor, device));
  prm.nwarps = pick_warps(kc, prm, device);
  prm.layout = pk::make_layout(kc.tensor_cores, kc.score_bytes, kc.key_bytes, prm.nwarps, prm.kp,
                               prm.k, prm.npairs);
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kc.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, prm.layout.total));

  const int64_t rows = int64_t{prm.nwarps} * pk::kRowsPerWarp;
  const int64_t blocks = (tokens + rows - 1) / rows;
  TORCH_CHECK(blocks <= INT_MAX, "memory.pk_topk: too many tokens, got ", tokens);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(heads));
  const dim3 block(static_cast<unsigned>(prm.nwarps * kWarpSize));
  kc.fn<<<grid, block, prm.layout.total, c10::cuda::getCurrentCUDAStream()>>>(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {scores, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(memory, CUDA, m) { m.impl("pk_topk", &pk_topk_cuda); }

}  // namespace memory_ext

// Benchmark of torch.ops.memory.pk_topk on CUDA against the reference path of the paper's
// release (two matmuls into full score tensors, three topk, a gather), in the same run.
//
// Shape (the paper's configuration per GPU): tokens 65536, heads 4, n_keys 1024, half 256,
// k 32, bf16. Reported for each path: median time over 30 runs (CUDA events, after 5
// warm-up runs; the 268 MB query is larger than L2), and the peak device memory it
// allocates beyond its inputs (c10 caching-allocator statistics). Two reference variants:
// scores kept in bf16 (what the release does) and scores cast to fp32 (what the op
// returns). The fused op is also timed at each CTA size (MEMORY_EXT_PK_TOPK_WARPS).
//
// Usage: bench_pk_topk [out.json] [tokens]. The op must be registered: link the library
// with --no-as-needed, or set MEMORY_EXT_LIB to the library (or the Python extension
// module) to load it at start.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/Device.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_timer.h"

namespace {

using Result = std::tuple<at::Tensor, at::Tensor>;

using bench::check_cuda;

bool op_registered() {
  return c10::Dispatcher::singleton().findSchema({"memory::pk_topk", ""}).has_value();
}

// The dispatcher entry of memory::pk_topk, loading the library named by MEMORY_EXT_LIB
// when the link did not already register it.
c10::TypedOperatorHandle<Result(const at::Tensor&, const at::Tensor&, int64_t)> find_op() {
  if (!op_registered()) {
    const char* lib = std::getenv("MEMORY_EXT_LIB");
    if (lib != nullptr && dlopen(lib, RTLD_NOW | RTLD_GLOBAL) == nullptr) {
      std::fprintf(stderr, "cannot load %s: %s\n", lib, dlerror());
      std::exit(1);
    }
  }
  if (!op_registered()) {
    std::fprintf(stderr,
                 "memory::pk_topk is not registered: link the memory_ext library "
                 "(--no-as-needed) or set MEMORY_EXT_LIB\n");
    std::exit(1);
  }
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("memory::pk_topk", "")
      .typed<Result(const at::Tensor&, const at::Tensor&, int64_t)>();
}

// Reference: full score tensors per half, topk of each, topk of the k x k candidate sums,
// gather of the indices. query (T, H, 2 half), keys (H, 2, n, half).
Result reference(const at::Tensor& query, const at::Tensor& keys, int64_t k, bool fp32_scores) {
  const int64_t half = keys.size(3), n = keys.size(2);
  auto q = query.transpose(0, 1);                                                 // (H, T, 2 half)
  auto s1 = at::matmul(q.narrow(2, 0, half), keys.select(1, 0).transpose(1, 2));  // (H, T, n)
  auto s2 = at::matmul(q.narrow(2, half, half), keys.select(1, 1).transpose(1, 2));
  if (fp32_scores) {
    s1 = s1.to(at::kFloat);
    s2 = s2.to(at::kFloat);
  }
  auto [v1, i1] = at::topk(s1, k, -1);
  auto [v2, i2] = at::topk(s2, k, -1);
  auto cand = (v1.to(at::kFloat).unsqueeze(-1) + v2.to(at::kFloat).unsqueeze(-2)).flatten(-2);
  auto [v, ic] = at::topk(cand, k, -1);
  auto idx =
      at::gather(i1, -1, at::floor_divide(ic, k)) * n + at::gather(i2, -1, at::remainder(ic, k));
  return {v.transpose(0, 1), idx.transpose(0, 1)};
}

struct Measure {
  double median_ms = 0;
  double peak_extra_mb = 0;
};

Measure measure(const std::function<Result()>& fn, int device) {
  Measure m;
  // Peak memory: one call from a clean peak counter, everything it allocated counted.
  check_cuda(cudaDeviceSynchronize(), "sync");
  c10::cuda::CUDACachingAllocator::emptyCache();
  const auto before =
      c10::cuda::CUDACachingAllocator::getDeviceStats(device).allocated_bytes[0].current;
  c10::cuda::CUDACachingAllocator::resetPeakStats(device);
  {
    auto r = fn();
    check_cuda(cudaDeviceSynchronize(), "sync");
  }
  const auto peak = c10::cuda::CUDACachingAllocator::getDeviceStats(device).allocated_bytes[0].peak;
  m.peak_extra_mb = static_cast<double>(peak - before) / (1 << 20);

  m.median_ms = bench::median_ms([&] { fn(); }, 5, 30);
  return m;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string out_path = argc > 1 ? argv[1] : "";
  const int64_t tokens = argc > 2 ? std::atoll(argv[2]) : 65536;
  const int64_t heads = 4, n_keys = 1024, half = 256, k = 32;
  int device = 0;
  check_cuda(cudaGetDevice(&device), "device");
  cudaDeviceProp prop{};
  check_cuda(cudaGetDeviceProperties(&prop, device), "properties");
  auto op = find_op();

  at::manual_seed(0);
  const auto opts = at::TensorOptions().device(at::kCUDA, device).dtype(at::kBFloat16);
  const auto query = at::randn({tokens, heads, 2 * half}, opts);
  const auto keys =
      at::randn({heads, 2, n_keys, half}, opts) / std::sqrt(static_cast<double>(half));

  // Agreement: the fused op against the fp32-score reference (indices may differ on
  // near-ties, so the share of equal indices and the largest score gap are reported).
  auto [s_op, i_op] = op.call(query, keys, k);
  auto [s_ref, i_ref] = reference(query, keys, k, true);
  const double same_idx = i_op.eq(i_ref).to(at::kDouble).mean().item<double>();
  const double max_gap = (s_op - s_ref).abs().max().item<double>();

  const Measure fused = measure([&] { return op.call(query, keys, k); }, device);
  const Measure ref_bf16 = measure([&] { return reference(query, keys, k, false); }, device);
  const Measure ref_fp32 = measure([&] { return reference(query, keys, k, true); }, device);
  std::vector<std::pair<int, double>> by_warps;
  for (int w : {1, 2, 4, 8}) {
    setenv("MEMORY_EXT_PK_TOPK_WARPS", std::to_string(w).c_str(), 1);
    by_warps.emplace_back(w, measure([&] { return op.call(query, keys, k); }, device).median_ms);
  }
  unsetenv("MEMORY_EXT_PK_TOPK_WARPS");

  std::printf("pk_topk on %s: tokens %lld, heads %lld, n_keys %lld, half %lld, k %lld, bf16\n",
              prop.name, static_cast<long long>(tokens), static_cast<long long>(heads),
              static_cast<long long>(n_keys), static_cast<long long>(half),
              static_cast<long long>(k));
  std::printf("%-34s %12s %16s\n", "path", "median ms", "peak extra MiB");
  std::printf("%-34s %12.3f %16.1f\n", "fused memory::pk_topk", fused.median_ms,
              fused.peak_extra_mb);
  std::printf("%-34s %12.3f %16.1f\n", "reference, bf16 scores", ref_bf16.median_ms,
              ref_bf16.peak_extra_mb);
  std::printf("%-34s %12.3f %16.1f\n", "reference, fp32 scores", ref_fp32.median_ms,
              ref_fp32.peak_extra_mb);
  for (const auto& [w, ms] : by_warps) std::printf("  fused, %d warps per CTA %19.3f\n", w, ms);
  std::printf("speedup vs reference: %.2fx (bf16 scores), %.2fx (fp32 scores)\n",
              ref_bf16.median_ms / fused.median_ms, ref_fp32.median_ms / fused.median_ms);
  std::printf("memory vs reference: %.2f%% (bf16 scores), %.2f%% (fp32 scores)\n",
              100 * fused.peak_extra_mb / ref_bf16.peak_extra_mb,
              100 * fused.peak_extra_mb / ref_fp32.peak_extra_mb);
  std::printf("agreement with the fp32 reference: %.4f of indices equal, max score gap %.3g\n",
              same_idx, max_gap);

  if (!out_path.empty()) {
    FILE* f = std::fopen(out_path.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "cannot write %s\n", out_path.c_str());
      return 1;
    }
    std::fprintf(f,
                 "{\n  \"benchmark\": \"pk_topk\",\n  \"device\": \"%s\",\n  \"torch\": \"%s\",\n"
                 "  \"shape\": {\"tokens\": %lld, \"heads\": %lld, \"n_keys\": %lld, \"half\": "
                 "%lld, \"k\": %lld, "
                 "\"dtype\": \"bfloat16\"},\n"
                 "  \"fused\": {\"median_ms\": %.4f, \"peak_extra_mib\": %.2f},\n"
                 "  \"reference_bf16_scores\": {\"median_ms\": %.4f, \"peak_extra_mib\": %.2f},\n"
                 "  \"reference_fp32_scores\": {\"median_ms\": %.4f, \"peak_extra_mib\": %.2f},\n"
                 "  \"fused_by_warps_ms\": {",
                 prop.name, TORCH_VERSION, static_cast<long long>(tokens),
                 static_cast<long long>(heads), static_cast<long long>(n_keys),
                 static_cast<long long>(half), static_cast<long long>(k), fused.median_ms,
                 fused.peak_extra_mb, ref_bf16.median_ms, ref_bf16.peak_extra_mb,
                 ref_fp32.median_ms, ref_fp32.peak_extra_mb);
    for (size_t i = 0; i < by_warps.size(); ++i)
      std::fprintf(f, "%s\"%d\": %.4f", i ? ", " : "", by_warps[i].first, by_warps[i].second);
    std::fprintf(f,
                 "},\n  \"indices_equal_to_fp32_reference\": %.6f,\n  \"max_score_gap\": %.6g\n}\n",
                 same_idx, max_gap);
    std::fclose(f);
  }
  return 0;
}

// Product-key top-k's benchmark cases, for any device: memory::pk_topk against the usual
// path built from ATen ops (two products into full half-score tensors, three topk, a
// gather; memory_ext.reference.pk_topk_reference_path), at bench/bench_pk_topk.py's shapes
// (CPU: tokens 4096, heads 4, n_keys 1024, half 128, k 32, float32 and bfloat16; CUDA:
// tokens 65536, half 256, bfloat16). Reported as tokens/s and GFLOP/s of the two
// half-score products (what both paths must compute) and, where the device has allocator
// statistics (CUDA), the peak bytes one call allocates beyond its inputs. The scores of
// the two paths are compared before any timing.
//
// Cases, "impl/pk_topk/dtype/tokens:T/n_keys:N/half:H/k:K":
//   memory_ext                 the op
//   reference                  scores from float32 copies of the inputs (the Python
//                              reference; what the op returns)
//   reference_native_scores    scores in the inputs' dtype (what the paper's release does;
//                              bfloat16 scores are not exact)
//   memory_ext_warps:W         CUDA only: the op with MEMORY_EXT_PK_TOPK_WARPS=W
// Options: --tokens T --heads H --n-keys N --half D --k K --dtypes float32,bfloat16
#pragma once

#include <cstdlib>
#include <memory>
#include <tuple>

#include "bench_harness.h"
#include "memory_ops.h"

namespace bench {

// query (T, H, 2 half), keys (H, 2, n, half) -> scores (T, H, k) float32, indices (T, H, k).
inline std::tuple<at::Tensor, at::Tensor> pk_topk_reference(const at::Tensor& query,
                                                            const at::Tensor& keys, int64_t k,
                                                            bool float_inputs) {
  const int64_t half = keys.size(-1), n_keys = keys.size(2);
  auto prep = [&](const at::Tensor& t) { return float_inputs ? t.to(at::kFloat) : t; };
  at::Tensor s1 =
      at::einsum("thd,hnd->thn", {prep(query.slice(-1, 0, half)), prep(keys.select(1, 0))});
  at::Tensor s2 =
      at::einsum("thd,hnd->thn", {prep(query.slice(-1, half)), prep(keys.select(1, 1))});
  auto [v1, i1] = s1.topk(k, -1);
  auto [v2, i2] = s2.topk(k, -1);
  const at::Tensor cand =
      (v1.to(at::kFloat).unsqueeze(-1) + v2.to(at::kFloat).unsqueeze(-2)).flatten(-2);
  const at::Tensor cand_idx = (i1.unsqueeze(-1) * n_keys + i2.unsqueeze(-2)).flatten(-2);
  auto [scores, pos] = cand.topk(k, -1);
  return {scores, cand_idx.gather(-1, pos)};
}

inline void register_pk_topk_cases(Options& o, const Run& run) {
  const bool q = run.quick, cuda = run.device.is_cuda();
  const int64_t tokens = o.integer("tokens", q ? 64 : (cuda ? 65536 : 4096));
  const int64_t heads = o.integer("heads", 4);
  const int64_t n_keys = o.integer("n-keys", q ? 128 : 1024);
  const int64_t half = o.integer("half", q ? 32 : (cuda ? 256 : 128));
  const int64_t k = o.integer("k", q ? 8 : 32);
  const auto dtypes = o.texts("dtypes", cuda ? std::vector<std::string>{"bfloat16"}
                                             : std::vector<std::string>{"float32", "bfloat16"});
  const MemoryOps ops = MemoryOps::find(cuda ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU);
  const Traffic traffic{0, double(tokens), 2.0 * 2.0 * tokens * heads * n_keys * half};

  for (const std::string& dt : dtypes) {
    const at::ScalarType dtype = dtype_named(dt);
    // Drawn once per dtype at registration (at most a few hundred MB).
    at::manual_seed(0);
    const at::Tensor query = at::randn({tokens, heads, 2 * half}, run.options(dtype));
    const at::Tensor keys =
        at::randn({heads, 2, n_keys, half}, run.options(dtype)) / std::sqrt(double(half));
    // The same answers first: an honest comparison needs equal scores.
    const at::Tensor ours = std::get<0>(ops.pk_topk.call(query, keys, k));
    const at::Tensor ref = std::get<0>(pk_topk_reference(query, keys, k, true));
    const double diff = (ours - ref).abs().max().item<double>();
    const double scale = std::max(1.0, ref.abs().max().item<double>());
    if (!(diff <= 1e-3 * scale)) {
      std::fprintf(stderr, "pk_topk and its reference disagree (%s): max score difference %g\n",
                   dt.c_str(), diff);
      std::exit(1);
    }
    // warps > 0: the case runs with MEMORY_EXT_PK_TOPK_WARPS=warps (read by each call).
    auto add = [&](const std::string& impl, Call call, int warps = 0) {
      add_case(run,
               case_name({impl, "pk_topk", dt, kv("tokens", tokens), kv("n_keys", n_keys),
                          kv("half", half), kv("k", k)}),
               [=](benchmark::State& st) {
                 if (warps > 0)
                   setenv("MEMORY_EXT_PK_TOPK_WARPS", std::to_string(warps).c_str(), 1);
                 if (run.peak_extra_bytes)
                   st.counters["peak_extra_mib"] = run.peak_extra_bytes(call) / (1 << 20);
                 run.loop(st, call);
                 report(st, traffic);
                 if (warps > 0) unsetenv("MEMORY_EXT_PK_TOPK_WARPS");
               });
    };
    add("memory_ext", [=] { benchmark::DoNotOptimize(ops.pk_topk.call(query, keys, k)); });
    add("reference", [=] { benchmark::DoNotOptimize(pk_topk_reference(query, keys, k, true)); });
    add("reference_native_scores",
        [=] { benchmark::DoNotOptimize(pk_topk_reference(query, keys, k, false)); });
    if (cuda) {
      for (int warps : {1, 2, 4, 8}) {
        add(
            "memory_ext_warps:" + std::to_string(warps),
            [=] { benchmark::DoNotOptimize(ops.pk_topk.call(query, keys, k)); }, warps);
      }
    }
  }
}

}  // namespace bench

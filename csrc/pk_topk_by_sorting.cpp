// pk_topk by sorting, built from ATen ops and so the same on every device: the path the
// CUDA pk_topk takes when k is too large for its fused kernel's shared memory (the op
// promises any k <= n_keys), and an op of its own, memory.pk_topk_by_sorting, so that the
// CPU tests check the path the GPU takes.
//
// Per (token, head): both half-score rows from one batched matmul each, each sorted
// (stable, descending: equal half-scores keep the lower sub-key first), then the pairs
// (a, b) of ranks with (a + 1) * (b + 1) <= k. Those hold the exact top-k: the pairs of
// ranks a' <= a, b' <= b score at least as much as (a, b), and there are (a + 1) * (b + 1)
// of them, so a pair outside the set has k pairs at least as good, all with lower indices
// where the sums tie through tied half-scores (the op's tie rule). About k * ln(k) pairs,
// not k^2. The candidates are ordered by index, then stably by score, descending: equal
// sums go to the lower index.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "memory_ext/checks.h"
#include "memory_ext/pk_topk_by_sorting.h"
#include "memory_ext/prologues.h"

namespace memory_ext {
namespace {

// Candidates per chunk of tokens (all heads): bounds the working memory to a few hundred
// MB whatever the number of tokens (sums, indices and the sorts' outputs).
constexpr int64_t kCandidatesPerChunk = int64_t{1} << 24;

// The rank pairs (a, b) with (a + 1) * (b + 1) <= k, as two int64 index vectors on device.
std::tuple<at::Tensor, at::Tensor> rank_pairs(int64_t k, const at::Device& device) {
  std::vector<int64_t> first, second;
  for (int64_t a = 0; a < k; ++a)
    for (int64_t b = 0; (a + 1) * (b + 1) <= k; ++b) {
      first.push_back(a);
      second.push_back(b);
    }
  const auto n = static_cast<int64_t>(first.size());
  const auto options = at::TensorOptions().dtype(at::kLong);
  return {at::tensor(first, options).view({n}).to(device),
          at::tensor(second, options).view({n}).to(device)};
}

// The first k of a stable descending sort along the last dimension: scores and indices.
std::tuple<at::Tensor, at::Tensor> top_k_stable(const at::Tensor& scores, int64_t k) {
  auto [values, indices] = scores.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true);
  return {values.narrow(-1, 0, k), indices.narrow(-1, 0, k)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pk_topk_by_sorting(const at::Tensor& query,
                                                      const at::Tensor& keys, int64_t k) {
  check_pk_topk_args(query, keys, k, "pk_topk_by_sorting");
  const int64_t tokens = query.size(0), heads = query.size(1);
  const int64_t n_keys = keys.size(2), half = keys.size(3);
  auto [scores, indices] = pk_topk_outputs(query, k);
  if (tokens == 0 || heads == 0) return {scores, indices};

  // bf16 and fp16 products are exact in float32: scores are float32 sums of them, as in
  // the kernels (float64 for float64).
  const at::ScalarType acc = acc_dtype(query.scalar_type());
  const at::Tensor sub_keys = keys.to(acc);
  const at::Tensor keys1 = sub_keys.select(1, 0).transpose(1, 2);  // (heads, half, n_keys)
  const at::Tensor keys2 = sub_keys.select(1, 1).transpose(1, 2);
  const auto [rank1, rank2] = rank_pairs(k, query.device());
  const int64_t candidates = rank1.size(0);
  const int64_t chunk = std::max<int64_t>(1, kCandidatesPerChunk / (heads * candidates));

  for (int64_t t0 = 0; t0 < tokens; t0 += chunk) {
    const int64_t n = std::min(chunk, tokens - t0);
    const at::Tensor q = query.narrow(0, t0, n).to(acc).transpose(0, 1);  // (heads, n, 2 half)
    const auto [score1, key1] = top_k_stable(at::bmm(q.narrow(2, 0, half), keys1), k);
    const auto [score2, key2] = top_k_stable(at::bmm(q.narrow(2, half, half), keys2), k);
    const at::Tensor sums = score1.index_select(2, rank1) + score2.index_select(2, rank2);
    const at::Tensor pairs = key1.index_select(2, rank1) * n_keys + key2.index_select(2, rank2);
    // Index order first, then a stable sort by score: equal sums keep the lower index first.
    const auto [pair_sorted, by_pair] = pairs.sort(/*stable=*/true, -1, /*descending=*/false);
    const auto [best, by_score] =
        sums.gather(2, by_pair).sort(/*stable=*/true, -1, /*descending=*/true);
    const at::Tensor chosen = by_score.narrow(2, 0, k);
    scores.narrow(0, t0, n).copy_(best.narrow(2, 0, k).transpose(0, 1));
    indices.narrow(0, t0, n).copy_(pair_sorted.gather(2, chosen).transpose(0, 1));
  }
  return {scores, indices};
}

// ATen ops only, so one function serves every backend; registered per backend (not as a
// composite) so that it is listed with the CPU and CUDA kernels of the other ops. Its fake
// kernel and gradient (pk_topk's) are in memory_ext/ops.py.
TORCH_LIBRARY_IMPL(memory, CPU, m) { m.impl("pk_topk_by_sorting", &pk_topk_by_sorting); }
#ifdef MEMORY_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(memory, CUDA, m) { m.impl("pk_topk_by_sorting", &pk_topk_by_sorting); }
#endif

}  // namespace memory_ext

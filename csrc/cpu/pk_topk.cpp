// CPU product-key search. Per block of tokens, half-scores come from one batched GEMM
// into a block-sized buffer (never a (tokens, heads, n_keys) tensor, never n_keys^2
// pairs); each (token, head) then selects the top k of each half and combines only the
// pairs whose rank product is <= k, which is exact: a pair at ranks (a, b) is beaten by
// the (a + 1)(b + 1) - 1 pairs above-left of it in the sorted grid.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "memory_ext/checks.h"
#include "topk_select.h"

namespace memory_ext {
namespace {

// Tokens per GEMM block: large enough for an efficient GEMM, small enough that the
// block's scores (heads * 2 * block * n_keys) stay a few MiB.
int64_t token_block(int64_t heads, int64_t n_keys) {
  const int64_t budget = int64_t(1) << 21;  // score elements per block
  return std::max<int64_t>(16, std::min<int64_t>(512, budget / std::max<int64_t>(1, 2 * heads * n_keys)));
}

template <typename S>
void select_block(const S* scores, int64_t block, int64_t heads, int64_t n_keys, int64_t k,
                  S* out_scores, int64_t* out_indices) {
  // scores: (heads, 2, block, n_keys); outputs: (block, heads, k)
  at::parallel_for(0, block * heads, 4, [&](int64_t r0, int64_t r1) {
    // Per-thread buffers, sized once: each half's candidates, then the pair candidates
    // (fewer than k * (1 + ln k) of them).
    std::vector<cpu::Scored<S>> half0(n_keys), half1(n_keys), cand;
    std::vector<S> scratch;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / heads, h = r % heads;
      cpu::select_top(scores + ((h * 2) * block + t) * n_keys, n_keys, k, half0.data(), scratch);
      cpu::select_top(scores + ((h * 2 + 1) * block + t) * n_keys, n_keys, k, half1.data(), scratch);
      cand.clear();
      for (int64_t a = 0; a < k; ++a)
        for (int64_t b = 0; (a + 1) * (b + 1) <= k; ++b)
          cand.push_back({half0[a].score + half1[b].score, half0[a].index * n_keys + half1[b].index});
      cpu::keep_best(cand.data(), static_cast<int64_t>(cand.size()), k);
      S* os = out_scores + r * k;
      int64_t* oi = out_indices + r * k;
      for (int64_t j = 0; j < k; ++j) {
        os[j] = cand[j].score;
        oi[j] = cand[j].index;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pk_topk_cpu(const at::Tensor& query, const at::Tensor& keys, int64_t k) {
  check_pk_topk_args(query, keys, k);
  const int64_t tokens = query.size(0), heads = query.size(1);
  const int64_t n_keys = keys.size(2), half = keys.size(3);
  // Scores are float32 (float64 for float64 inputs, so gradcheck can run).
  const auto score_type = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto scores = at::empty({tokens, heads, k}, query.options().dtype(score_type));
  auto indices = at::empty({tokens, heads, k}, query.options().dtype(at::kLong));
  if (tokens == 0 || heads == 0) return {scores, indices};

  // (heads * 2, half, n_keys) in the score dtype: transposed once, reused by every block.
  const auto keys_t = keys.to(score_type).reshape({heads * 2, n_keys, half}).transpose(1, 2);
  const int64_t block = token_block(heads, n_keys);
  auto buffer = at::empty({heads * 2 * block * n_keys}, query.options().dtype(score_type));
  AT_DISPATCH_FLOATING_TYPES(score_type, "pk_topk_cpu", [&] {
    for (int64_t t0 = 0; t0 < tokens; t0 += block) {
      const int64_t bt = std::min(block, tokens - t0);
      // (bt, heads, 2, half) -> (heads * 2, bt, half)
      const auto q = query.narrow(0, t0, bt).to(score_type).reshape({bt, heads * 2, half}).transpose(0, 1);
      auto s = buffer.narrow(0, 0, heads * 2 * bt * n_keys).view({heads * 2, bt, n_keys});
      at::bmm_out(s, q, keys_t);
      select_block<scalar_t>(s.const_data_ptr<scalar_t>(), bt, heads, n_keys, k,
                             scores.mutable_data_ptr<scalar_t>() + t0 * heads * k,
                             indices.mutable_data_ptr<int64_t>() + t0 * heads * k);
    }
  });
  return {scores, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(memory, CPU, m) { m.impl("pk_topk", &pk_topk_cpu); }

}  // namespace memory_ext

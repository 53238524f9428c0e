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

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "bf16_scores.h"
#include "memory_ext/checks.h"
#include "memory_ext/prologues.h"
#include "topk_select.h"

namespace memory_ext {
namespace {

// Tokens per GEMM block: large enough for an efficient GEMM, small enough that the
// block's scores (heads * 2 * block * n_keys) stay a few MiB.
int64_t token_block(int64_t heads, int64_t n_keys) {
  const int64_t budget = int64_t(1) << 21;  // score elements per block
  return std::max<int64_t>(
      16, std::min<int64_t>(512, budget / std::max<int64_t>(1, 2 * heads * n_keys)));
}

// Rows (token, head) per task of the selection; all rows on the calling thread when the
// block is small: up to kInlineScores half-scores (16 tokens of 4 heads over 2 x 128
// sub-keys, tens of microseconds of selection on one core) the wake-up of a second
// thread and the wait for the slower one cost about what they save, and on a loaded
// machine a descheduled worker stalls the call for milliseconds (bench/bench_decode.py).
// Each row's selection is the same either way, so results do not depend on it.
constexpr int64_t kInlineScores = int64_t(1) << 15;

int64_t select_grain(int64_t block, int64_t heads, int64_t n_keys) {
  return block * heads * 2 * n_keys <= kInlineScores ? std::max<int64_t>(1, block * heads) : 4;
}

// Generic path (float64 scores for gradcheck, or n_keys^2 beyond 32-bit indices).
template <typename S>
void select_block(const S* scores, int64_t block, int64_t heads, int64_t n_keys, int64_t k,
                  S* out_scores, int64_t* out_indices) {
  // scores: (heads, 2, block, n_keys); outputs: (block, heads, k)
  const int64_t grain = select_grain(block, heads, n_keys);
  at::parallel_for(0, block * heads, grain, [&](int64_t r0, int64_t r1) {
    // Per-thread buffers, sized once: each half's candidates, then the pair candidates
    // (fewer than k * (1 + ln k) of them).
    std::vector<cpu::Scored<S>> half0(n_keys), half1(n_keys), cand;
    std::vector<S> scratch;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / heads, h = r % heads;
      cpu::select_top(scores + ((h * 2) * block + t) * n_keys, n_keys, k, half0.data(), scratch);
      cpu::select_top(scores + ((h * 2 + 1) * block + t) * n_keys, n_keys, k, half1.data(),
                      scratch);
      cand.clear();
      for (int64_t a = 0; a < k; ++a)
        for (int64_t b = 0; (a + 1) * (b + 1) <= k; ++b)
          cand.push_back(
              {half0[a].score + half1[b].score, half0[a].index * n_keys + half1[b].index});
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

// A lower bound of the k-th best pair sum: the pairs (a, 0) and (0, b) are 2k - 1 distinct
// candidates, and both runs of sums are non-increasing, so their k-th largest comes from a
// two-pointer merge. -inf (no pruning) unless every half score is finite.
float pair_bar(const float* s0, const float* s1, int64_t k) {
  if (!std::isfinite(s0[0]) || !std::isfinite(s0[k - 1]) || !std::isfinite(s1[0]) ||
      !std::isfinite(s1[k - 1]))
    return -std::numeric_limits<float>::infinity();
  int64_t a = 0, b = 1;
  float kth = s0[0] + s1[0];
  for (int64_t taken = 0; taken < k; ++taken) {
    const float down = a < k ? s0[a] + s1[0] : -std::numeric_limits<float>::infinity();
    const float right = b < k ? s0[0] + s1[b] : -std::numeric_limits<float>::infinity();
    if (down >= right) {
      kth = down;
      ++a;
    } else {
      kth = right;
      ++b;
    }
  }
  return kth;
}

// float scores, n_keys^2 <= 2^32: packed 64-bit keys (topk_select.h), and the pair
// candidates pruned by pair_bar before they are sorted.
void select_block_packed(const float* scores, int64_t block, int64_t heads, int64_t n_keys,
                         int64_t k, float* out_scores, int64_t* out_indices) {
  // Aim the guessed bar at ~1.3 k survivors; pointless when that is most of the row. Once
  // per block, not per task (40 erfc calls).
  const double tail = 1.3 * double(k) / double(n_keys);
  const float z_guess = tail < 0.25 ? cpu::upper_quantile(tail) : 0.0f;
  const int64_t grain = select_grain(block, heads, n_keys);
  at::parallel_for(0, block * heads, grain, [&](int64_t r0, int64_t r1) {
    std::vector<uint64_t> half0(n_keys), half1(n_keys), cand;
    std::vector<float> scratch, s0(k), s1(k);
    std::vector<int64_t> i0(k), i1(k);
    cand.reserve(static_cast<size_t>(k * (2 + std::log(double(k)))));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / heads, h = r % heads;
      cpu::select_top_packed(scores + ((h * 2) * block + t) * n_keys, n_keys, k, z_guess,
                             half0.data(), scratch);
      cpu::select_top_packed(scores + ((h * 2 + 1) * block + t) * n_keys, n_keys, k, z_guess,
                             half1.data(), scratch);
      for (int64_t j = 0; j < k; ++j) {
        s0[j] = cpu::packed_score(half0[j]), i0[j] = cpu::packed_index(half0[j]) * n_keys;
        s1[j] = cpu::packed_score(half1[j]), i1[j] = cpu::packed_index(half1[j]);
      }
      const float bar = pair_bar(s0.data(), s1.data(), k);
      cand.clear();
      for (int64_t a = 0; a < k; ++a) {
        for (int64_t b = 0; (a + 1) * (b + 1) <= k; ++b) {
          const float sum = s0[a] + s1[b];
          if (sum < bar) break;  // sums fall along b
          cand.push_back(cpu::pack_score(sum, uint32_t(i0[a] + i1[b])));
        }
      }
      cpu::keep_best_packed(cand.data(), static_cast<int64_t>(cand.size()), k);
      float* os = out_scores + r * k;
      int64_t* oi = out_indices + r * k;
      for (int64_t j = 0; j < k; ++j) {
        os[j] = cpu::packed_score(cand[j]);
        oi[j] = cpu::packed_index(cand[j]);
      }
    }
  });
}

// Calls of fewer tokens (decode steps, small batches) are scored in float32 even where our
// bf16 kernels run: packing and checking the sub-keys costs more than their GEMM saves
// (4 heads x 1024 x 128 bf16 on a 2-core Xeon, tile path against float32: 1 token 0.6 ms
// against 0.26, 32 tokens 1.0 against 0.88, 64 tokens 1.33 against 1.44; on a 2-core AMD
// EPYC, AVX512-BF16 against float32: 1 token 0.39-0.49 against 0.23, 32 tokens 0.74-1.05
// against 1.04-1.10, 64 tokens 1.33-1.85 against 1.93-1.98).
constexpr int64_t kBf16KernelMinTokens = 64;

// The half-scores of a block of tokens, (heads * 2, tokens, n_keys) in the score dtype.
// bf16 inputs of kBf16KernelMinTokens tokens or more go to our AMX or AVX512-BF16 scoring where
// the CPU has one (bf16_scores.h), unless an input is subnormal (which both read as zero);
// everything else to torch's GEMM on the inputs converted to the score dtype.
class HalfScorer {
 public:
  HalfScorer(const at::Tensor& query, const at::Tensor& keys, at::ScalarType score_type)
      : query_(query),
        groups_(query.size(1) * 2),
        n_keys_(keys.size(2)),
        half_(keys.size(3)),
        score_type_(score_type) {
    bf16_kernel_ = query.scalar_type() == at::kBFloat16 && query.size(0) >= kBf16KernelMinTokens &&
                   cpu::bf16_scores_supports(n_keys_, half_) && cpu::bf16_scores_available();
    if (bf16_kernel_) {
      const auto keys_c = keys.contiguous();
      query_ = query.contiguous();
      const auto* k_bits = reinterpret_cast<const uint16_t*>(keys_c.const_data_ptr());
      bf16_kernel_ = !cpu::has_bf16_subnormals(query_bits(), query_.numel()) &&
                     !cpu::has_bf16_subnormals(k_bits, keys_c.numel());
      if (bf16_kernel_) packed_keys_ = cpu::pack_bf16_keys(k_bits, groups_, n_keys_, half_);
    }
    // (heads * 2, half, n_keys) in the score dtype: transposed once, reused by every block.
    if (!bf16_kernel_)
      keys_t_ = keys.to(score_type).reshape({groups_, n_keys_, half_}).transpose(1, 2);
  }

  // out (heads * 2, bt, n_keys) = the scores of tokens t0 .. t0 + bt - 1.
  void score(int64_t t0, int64_t bt, at::Tensor& out) const {
    if (!bf16_kernel_) {
      // (bt, heads, 2, half) -> (heads * 2, bt, half)
      const auto q =
          query_.narrow(0, t0, bt).to(score_type_).reshape({bt, groups_, half_}).transpose(0, 1);
      at::bmm_out(out, q, keys_t_);
      return;
    }
    const uint16_t* q = query_bits() + t0 * groups_ * half_;
    float* o = reinterpret_cast<float*>(out.mutable_data_ptr());
    // A group per task; one task for a few tokens (a decode step), where a second thread
    // would cost more than it saves.
    const int64_t grain = bt * n_keys_ * half_ < (int64_t(1) << 18) ? groups_ : 1;
    at::parallel_for(0, groups_, grain, [&](int64_t g0, int64_t g1) {
      cpu::bf16_scores(q, groups_ * half_, packed_keys_.data(), g0, g1, bt, n_keys_, half_, o);
    });
  }

 private:
  const uint16_t* query_bits() const {
    return reinterpret_cast<const uint16_t*>(query_.const_data_ptr());
  }

  at::Tensor query_;  // contiguous where our bf16 kernel scores it
  at::Tensor keys_t_;
  std::vector<uint16_t> packed_keys_;
  int64_t groups_, n_keys_, half_;
  at::ScalarType score_type_;
  bool bf16_kernel_ = false;
};

std::tuple<at::Tensor, at::Tensor> pk_topk_cpu(const at::Tensor& query, const at::Tensor& keys,
                                               int64_t k) {
  check_pk_topk_args(query, keys, k);
  const int64_t tokens = query.size(0), heads = query.size(1);
  const int64_t n_keys = keys.size(2);
  // Scores are float32 (float64 for float64 inputs, so gradcheck can run).
  const auto score_type = acc_dtype(query.scalar_type());
  auto [scores, indices] = pk_topk_outputs(query, k);
  if (tokens == 0 || heads == 0) return {scores, indices};

  const HalfScorer scorer(query, keys, score_type);
  // No larger than the call: a decode step scores one token or a few.
  const int64_t block = std::min(token_block(heads, n_keys), tokens);
  auto buffer = at::empty({heads * 2 * block * n_keys}, query.options().dtype(score_type));
  AT_DISPATCH_FLOATING_TYPES(score_type, "pk_topk_cpu", [&] {
    for (int64_t t0 = 0; t0 < tokens; t0 += block) {
      const int64_t bt = std::min(block, tokens - t0);
      auto s = buffer.narrow(0, 0, heads * 2 * bt * n_keys).view({heads * 2, bt, n_keys});
      scorer.score(t0, bt, s);
      scalar_t* out_scores = scores.mutable_data_ptr<scalar_t>() + t0 * heads * k;
      int64_t* out_indices = indices.mutable_data_ptr<int64_t>() + t0 * heads * k;
      // scalar_t is an alias inside the dispatch lambda, not a template parameter, so this
      // branch is compiled for every type: the cast is a no-op where it runs (float).
      if (std::is_same_v<scalar_t, float> && n_keys <= 65536) {
        select_block_packed(s.const_data_ptr<float>(), bt, heads, n_keys, k,
                            reinterpret_cast<float*>(out_scores), out_indices);
        continue;
      }
      select_block<scalar_t>(s.const_data_ptr<scalar_t>(), bt, heads, n_keys, k, out_scores,
                             out_indices);
    }
  });
  return {scores, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(memory, CPU, m) { m.impl("pk_topk", &pk_topk_cpu); }

}  // namespace memory_ext

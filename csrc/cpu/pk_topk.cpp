// CPU product-key search. Half-scores come from our kernels a tile of tokens of one head at
// a time into a per-thread buffer that stays in L2 (topk_by_tiles), or, for calls they do
// not take, from one batched GEMM per block of tokens into a block-sized buffer; never a
// (tokens, heads, n_keys) tensor, never n_keys^2 pairs. Each (token, head) then selects the
// top k of each half and combines only the pairs whose rank product is <= k, which is
// exact: a pair at ranks (a, b) is beaten by the (a + 1)(b + 1) - 1 pairs above-left of it
// in the sorted grid.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "bf16_scores.h"
#include "dot_blocks.h"
#include "f32_scores.h"
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

// The guess of select_top_packed's bar, z standard deviations above a row's mean: aimed at
// ~1.3 k survivors; none (0) when that is most of the row. Once per call (40 erfc calls).
float bar_guess(int64_t n_keys, int64_t k) {
  const double tail = 1.3 * double(k) / double(n_keys);
  return tail < 0.25 ? cpu::upper_quantile(tail) : 0.0f;
}

// The top k pairs of one (token, head) from its two rows of float half-scores, n_keys^2 <=
// 2^32: packed 64-bit keys (topk_select.h), and the pair candidates pruned by pair_bar
// before they are sorted. Holds its workspace, sized once: one per thread.
class PairSelector {
 public:
  PairSelector(int64_t n_keys, int64_t k, float z_guess)
      : n_keys_(n_keys),
        k_(k),
        z_guess_(z_guess),
        half0_(n_keys),
        half1_(n_keys),
        s0_(k),
        s1_(k),
        i0_(k),
        i1_(k) {
    cand_.reserve(static_cast<size_t>(k * (2 + std::log(double(k)))));
  }

  void select(const float* row0, const float* row1, float* out_scores, int64_t* out_indices) {
    cpu::select_top_packed(row0, n_keys_, k_, z_guess_, half0_.data(), scratch_);
    cpu::select_top_packed(row1, n_keys_, k_, z_guess_, half1_.data(), scratch_);
    for (int64_t j = 0; j < k_; ++j) {
      s0_[j] = cpu::packed_score(half0_[j]), i0_[j] = cpu::packed_index(half0_[j]) * n_keys_;
      s1_[j] = cpu::packed_score(half1_[j]), i1_[j] = cpu::packed_index(half1_[j]);
    }
    const float bar = pair_bar(s0_.data(), s1_.data(), k_);
    cand_.clear();
    for (int64_t a = 0; a < k_; ++a) {
      for (int64_t b = 0; (a + 1) * (b + 1) <= k_; ++b) {
        const float sum = s0_[a] + s1_[b];
        if (sum < bar) break;  // sums fall along b
        cand_.push_back(cpu::pack_score(sum, uint32_t(i0_[a] + i1_[b])));
      }
    }
    cpu::keep_best_packed(cand_.data(), static_cast<int64_t>(cand_.size()), k_);
    for (int64_t j = 0; j < k_; ++j) {
      out_scores[j] = cpu::packed_score(cand_[j]);
      out_indices[j] = cpu::packed_index(cand_[j]);
    }
  }

 private:
  int64_t n_keys_, k_;
  float z_guess_;
  std::vector<uint64_t> half0_, half1_, cand_;
  std::vector<float> scratch_, s0_, s1_;
  std::vector<int64_t> i0_, i1_;
};

// torch's GEMM path for float scores: the top k of every (token, head) of a block.
void select_block_packed(const float* scores, int64_t block, int64_t heads, int64_t n_keys,
                         int64_t k, float z_guess, float* out_scores, int64_t* out_indices) {
  at::parallel_for(0, block * heads, select_grain(block, heads, n_keys),
                   [&](int64_t r0, int64_t r1) {
                     PairSelector selector(n_keys, k, z_guess);
                     for (int64_t r = r0; r < r1; ++r) {
                       const int64_t t = r / heads, h = r % heads;
                       selector.select(scores + ((h * 2) * block + t) * n_keys,
                                       scores + ((h * 2 + 1) * block + t) * n_keys,
                                       out_scores + r * k, out_indices + r * k);
                     }
                   });
}

// Calls of fewer tokens (decode steps, small batches) go to torch's GEMM even where our
// kernels run: packing and checking the sub-keys costs more than their GEMM saves
// (4 heads x 1024 x 128 bf16 on a 2-core Xeon, tile path against float32: 1 token 0.6 ms
// against 0.26, 32 tokens 1.0 against 0.88, 64 tokens 1.33 against 1.44; on a 2-core AMD
// EPYC, AVX512-BF16 against float32: 1 token 0.39-0.49 against 0.23, 32 tokens 0.74-1.05
// against 1.04-1.10, 64 tokens 1.33-1.85 against 1.93-1.98). Our float32 path runs about as
// fast as torch's GEMM path on small calls and faster on large ones (same AMD EPYC, medians
// of three runs each: 64 tokens 1.2-1.8 ms against 1.1-1.7, 256 tokens 5.3-5.9 against
// 5.0-6.0, 2048 tokens 32-44 against 39-54), and its sums do not depend on the thread count,
// so it shares the threshold.
constexpr int64_t kKernelMinTokens = 64;

// Half-scores per tile (both halves of one head): 512 KiB of float32, which stays in L2
// from our kernel's stores to the selection's reads.
constexpr int64_t kTileScores = int64_t(1) << 17;

// Uninitialised arrays aligned to 64 bytes, so that the kernels' vector loads of packed
// sub-keys and stores of scores never straddle two cache lines.
struct FreeArray {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
using AlignedArray = std::unique_ptr<T[], FreeArray>;

template <typename T>
AlignedArray<T> aligned_array(int64_t n) {
  const size_t bytes = (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64;
  T* p = static_cast<T*>(std::aligned_alloc(64, bytes));
  TORCH_CHECK(p != nullptr, "memory.pk_topk: out of memory for ", bytes, " bytes of workspace");
  return AlignedArray<T>(p);
}

// Our scoring kernels, which score a tile of tokens of one head at a time (TileScorer).
enum class TileKernel { kNone, kBf16, kF32 };

// bf16 inputs go to our AMX or AVX512-BF16 kernel (bf16_scores.h) unless an input is
// subnormal (which both read as zero); float32 inputs, and float16 or bf16 ones converted to
// float32 (exactly), to our AVX-512 kernel (f32_scores.h); calls neither takes (float64,
// fewer tokens than kKernelMinTokens, n_keys not a multiple of 32 or above 65536, a CPU
// without the instructions) to torch's GEMM. query and keys contiguous.
TileKernel tile_kernel(const at::Tensor& query, const at::Tensor& keys) {
  const int64_t n_keys = keys.size(2), half = keys.size(3);
  if (query.size(0) < kKernelMinTokens || n_keys > 65536) return TileKernel::kNone;
  const auto dtype = query.scalar_type();
  if (dtype == at::kBFloat16 && cpu::bf16_scores_supports(n_keys, half) &&
      cpu::bf16_scores_available() &&
      !cpu::has_bf16_subnormals(reinterpret_cast<const uint16_t*>(query.const_data_ptr()),
                                query.numel()) &&
      !cpu::has_bf16_subnormals(reinterpret_cast<const uint16_t*>(keys.const_data_ptr()),
                                keys.numel()))
    return TileKernel::kBf16;
  if ((dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf) &&
      cpu::f32_scores_supports(n_keys, half) && cpu::f32_scores_available())
    return TileKernel::kF32;
  return TileKernel::kNone;
}

// The sub-keys packed for one of our kernels, and the tile scores it writes. query and keys
// contiguous, in a call that tile_kernel gives to kernel.
class TileScorer {
 public:
  TileScorer(const at::Tensor& query, const at::Tensor& keys, TileKernel kernel)
      : query_(query),
        groups_(query.size(1) * 2),
        n_keys_(keys.size(2)),
        half_(keys.size(3)),
        bf16_(kernel == TileKernel::kBf16) {
    const int64_t values = keys.numel();
    if (bf16_) {
      const auto* k_bits = reinterpret_cast<const uint16_t*>(keys.const_data_ptr());
      packed_bf16_ = aligned_array<uint16_t>(values);  // packing writes every value
      at::parallel_for(0, groups_, 1, [&](int64_t g0, int64_t g1) {
        cpu::pack_bf16_keys(k_bits, g0, g1, n_keys_, half_, packed_bf16_.get());
      });
      return;
    }
    packed_f32_ = aligned_array<float>(values);
    switch (keys.scalar_type()) {  // the dtypes tile_kernel gives to kF32
      case at::kBFloat16:
        pack_f32(keys.const_data_ptr<at::BFloat16>());
        break;
      case at::kHalf:
        pack_f32(keys.const_data_ptr<at::Half>());
        break;
      default:
        pack_f32(keys.const_data_ptr<float>());
    }
  }

  // Tokens per tile: whole blocks of the kernel, both halves' scores within kTileScores.
  int64_t tile_tokens() const {
    const int64_t unit = bf16_ ? cpu::bf16_scores_block_tokens() : cpu::kDotTokens;
    return unit * std::clamp<int64_t>(kTileScores / (2 * n_keys_ * unit), 1, 8);
  }

  // out (2, bt, n_keys) = the two halves' scores of head h for tokens t0 .. t0 + bt - 1;
  // staging holds float16 or bf16 queries converted to float32.
  void score(int64_t t0, int64_t bt, int64_t h, float* out, std::vector<float>& staging) const {
    const int64_t g = 2 * h, token_stride = groups_ * half_;
    if (bf16_) {
      cpu::bf16_scores(query_bits() + t0 * token_stride + g * half_, token_stride,
                       packed_bf16_.get() + g * n_keys_ * half_, 0, 2, bt, n_keys_, half_, out);
      return;
    }
    const float* q = nullptr;
    int64_t q_stride = token_stride;
    if (query_.scalar_type() == at::kFloat) {
      q = query_.const_data_ptr<float>() + t0 * token_stride + g * half_;
    } else {
      staging.resize(static_cast<size_t>(bt * 2 * half_));
      AT_DISPATCH_REDUCED_FLOATING_TYPES(query_.scalar_type(), "pk_topk_cpu", [&] {
        const scalar_t* src = query_.const_data_ptr<scalar_t>() + t0 * token_stride + g * half_;
        for (int64_t t = 0; t < bt; ++t)
          for (int64_t d = 0; d < 2 * half_; ++d)
            staging[t * 2 * half_ + d] = static_cast<float>(src[t * token_stride + d]);
      });
      q = staging.data();
      q_stride = 2 * half_;
    }
    cpu::f32_scores(q, q_stride, packed_f32_.get() + g * n_keys_ * half_, 0, 2, bt, n_keys_, half_,
                    out);
  }

 private:
  template <typename T>
  void pack_f32(const T* keys) {
    at::parallel_for(0, groups_, 1, [&](int64_t g0, int64_t g1) {
      cpu::pack_f32_keys(keys, g0, g1, n_keys_, half_, packed_f32_.get());
    });
  }

  const uint16_t* query_bits() const {
    return reinterpret_cast<const uint16_t*>(query_.const_data_ptr());
  }

  at::Tensor query_;
  int64_t groups_, n_keys_, half_;
  bool bf16_;
  AlignedArray<uint16_t> packed_bf16_;
  AlignedArray<float> packed_f32_;
};

// Scores and selects a tile of tokens of one head per task: the tile's scores go from our
// kernel's stores to the selection while they are in L2. Tasks run head by head, so that a
// thread's consecutive tasks read the same head's sub-keys.
void topk_by_tiles(const at::Tensor& query, const at::Tensor& keys, TileKernel kernel, int64_t k,
                   float* out_scores, int64_t* out_indices) {
  const int64_t tokens = query.size(0), heads = query.size(1), n_keys = keys.size(2);
  const TileScorer scorer(query, keys, kernel);
  const int64_t tile = scorer.tile_tokens(), tiles = (tokens + tile - 1) / tile;
  const float z_guess = bar_guess(n_keys, k);
  at::parallel_for(0, heads * tiles, 1, [&](int64_t task0, int64_t task1) {
    // the kernel writes each tile's scores before they are read
    const auto scores = aligned_array<float>(2 * tile * n_keys);
    std::vector<float> staging;
    PairSelector selector(n_keys, k, z_guess);
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t h = task / tiles, t0 = (task % tiles) * tile;
      const int64_t bt = std::min(tile, tokens - t0);
      scorer.score(t0, bt, h, scores.get(), staging);
      for (int64_t t = 0; t < bt; ++t) {
        const int64_t r = (t0 + t) * heads + h;
        selector.select(scores.get() + t * n_keys, scores.get() + (bt + t) * n_keys,
                        out_scores + r * k, out_indices + r * k);
      }
    }
  });
}

// The half-scores of a block of tokens from torch's GEMM on the inputs converted to the
// score dtype, (heads * 2, tokens, n_keys).
class GemmScorer {
 public:
  GemmScorer(const at::Tensor& query, const at::Tensor& keys, at::ScalarType score_type)
      : query_(query), groups_(query.size(1) * 2), half_(keys.size(3)), score_type_(score_type) {
    // (heads * 2, half, n_keys) in the score dtype: transposed once, reused by every block.
    keys_t_ = keys.to(score_type).reshape({groups_, keys.size(2), half_}).transpose(1, 2);
  }

  // out (heads * 2, bt, n_keys) = the scores of tokens t0 .. t0 + bt - 1.
  void score(int64_t t0, int64_t bt, at::Tensor& out) const {
    // (bt, heads, 2, half) -> (heads * 2, bt, half)
    const auto q =
        query_.narrow(0, t0, bt).to(score_type_).reshape({bt, groups_, half_}).transpose(0, 1);
    at::bmm_out(out, q, keys_t_);
  }

 private:
  at::Tensor query_, keys_t_;
  int64_t groups_, half_;
  at::ScalarType score_type_;
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

  const auto query_c = query.contiguous(), keys_c = keys.contiguous();
  const auto kernel = tile_kernel(query_c, keys_c);
  if (kernel != TileKernel::kNone) {
    topk_by_tiles(query_c, keys_c, kernel, k, scores.mutable_data_ptr<float>(),
                  indices.mutable_data_ptr<int64_t>());
    return {scores, indices};
  }
  const GemmScorer scorer(query, keys, score_type);
  // No larger than the call: a decode step scores one token or a few.
  const int64_t block = std::min(token_block(heads, n_keys), tokens);
  auto buffer = at::empty({heads * 2 * block * n_keys}, query.options().dtype(score_type));
  const float z_guess = bar_guess(n_keys, k);
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
        select_block_packed(s.const_data_ptr<float>(), bt, heads, n_keys, k, z_guess,
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

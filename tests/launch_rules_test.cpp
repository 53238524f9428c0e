// The host-side launch decisions of the CUDA ops (memory_ext/launch_rules.h and the
// launch section of csrc/cuda/pk_topk_common.cuh), checked on the CPU: vector width from
// alignment (and its step-down to 8-, 4-byte and element accesses), the rows_to_dense copy
// unit, the embedding_bag backward's short-run schedule, what happens to bad lookups, the
// pk_topk kernel and its CTA size.
//
// Build: g++ -std=c++20 -O2 -Icsrc/include -Icsrc/cuda tests/launch_rules_test.cpp
// Run:   ./a.out   (exit status 0 when every check holds; prints each check)
#include <cstdint>
#include <cstdio>

#include "memory_ext/launch_rules.h"
#include "pk_topk_common.cuh"

namespace {

int g_failed = 0, g_checks = 0;

void check(bool ok, const char* what) {
  ++g_checks;
  if (!ok) ++g_failed;
  std::printf("%s: %s\n", what, ok ? "ok" : "FAILED");
}

const void* at(uintptr_t address) { return reinterpret_cast<const void*>(address); }

}  // namespace

int main() {
  namespace cu = memory_ext::cuda;
  namespace pk = memory_ext::cuda::pk;

  check(cu::use_vector_path(64, 8, {at(0x1000), at(0x2010)}), "vector: whole vectors, aligned");
  check(!cu::use_vector_path(60, 8, {at(0x1000)}), "vector: row not a whole number of vectors");
  check(!cu::use_vector_path(64, 8, {at(0x1000), at(0x1008)}), "vector: one base 8-byte aligned");
  check(cu::use_vector_path(64, 8, {at(0x1000), nullptr}), "vector: unused (null) buffer");

  // bf16 rows (2-byte elements, up to 8 per access) next to float32 partial sums.
  check(cu::widest_vector(64, 8, {{at(0x1000), 2}, {at(0x2010), 2}}) == 8, "widest: 16 bytes");
  check(cu::widest_vector(36, 8, {{at(0x1000), 2}, {at(0x2000), 2}}) == 4,
        "widest: 72-byte rows take 8-byte vectors");
  check(cu::widest_vector(6, 8, {{at(0x1000), 2}}) == 2, "widest: 12-byte rows take 4 bytes");
  check(cu::widest_vector(3, 8, {{at(0x1000), 2}}) == 1, "widest: 6-byte rows take elements");
  check(cu::widest_vector(64, 8, {{at(0x1000), 2}, {at(0x1008), 2}}) == 4,
        "widest: a view 8 bytes into its storage");
  check(cu::widest_vector(64, 8, {{at(0x1004), 2}, {at(0x1000), 2}}) == 2,
        "widest: a view 4 bytes into its storage");
  check(cu::widest_vector(64, 8, {{at(0x1000), 2}, {at(0x1002), 2}}) == 1,
        "widest: a view 2 bytes into its storage");
  check(cu::widest_vector(64, 8, {{at(0x1000), 2}, {nullptr, 4}}) == 8,
        "widest: an unused (null) buffer does not count");
  check(cu::widest_vector(64, 8, {{at(0x1000), 2}, {at(0x2010), 4}}) == 8,
        "widest: 32-byte float32 vectors need only 16-byte alignment");
  check(cu::widest_vector(64, 8, {{at(0x1000), 2}, {at(0x2008), 4}}) == 2,
        "widest: float32 partial sums 8-byte aligned allow 2 columns");
  check(cu::widest_vector(64, 4, {{at(0x1008), 4}}) == 2, "widest: float32, 8-byte view");
  check(cu::widest_vector(64, 2, {{at(0x1008), 8}}) == 1, "widest: float64, 8-byte view");
  check(cu::widest_vector(0, 8, {{at(0x1000), 2}}) == 8, "widest: empty rows");
  int picked = 0;
  cu::with_vector<8>(4, [&]<int V>() { picked = V; });
  check(picked == 4, "with_vector: dispatches the chosen width");
  cu::with_vector<8>(1, [&]<int V>() { picked = V; });
  check(picked == 1, "with_vector: down to one element");

  check(cu::dense_copy_unit(32, at(0x100), at(0x200)) == 16, "dense unit 16");
  check(cu::dense_copy_unit(24, at(0x100), at(0x200)) == 8, "dense unit 8: row of 24 bytes");
  check(cu::dense_copy_unit(32, at(0x104), at(0x200)) == 4, "dense unit 4: source 4-aligned");
  check(cu::dense_copy_unit(6, at(0x100), at(0x200)) == 2, "dense unit 2: row of 6 bytes");
  check(cu::dense_copy_unit(32, at(0x100), at(0x201)) == 1, "dense unit 1: odd destination");
  check(cu::dense_copy_unit(0, at(0x100), at(0x200)) == 16, "dense unit: empty rows");

  // The backward's short-run schedule: 1M lookups over 1M rows (mostly unique) take it; a
  // run cut into segments, rows wider than a warp's 128 accesses or long average runs do
  // not.
  check(cu::use_short_run_backward(632000, 632000, 0, 1000000, 64),
        "short runs: 1M lookups of 1M rows, 632K distinct");
  check(cu::use_short_run_backward(1000, 1000, 0, 4000, 128),
        "short runs: mean run of 4 lookups, 128 accesses per row");
  check(!cu::use_short_run_backward(1000, 1000, 0, 4001, 128),
        "short runs: mean run above 4 lookups takes the segment kernel");
  check(!cu::use_short_run_backward(1000, 1000, 0, 1000, 129),
        "short runs: rows of more than one warp's 128 accesses");
  check(!cu::use_short_run_backward(1000, 1002, 1, 2000, 16),
        "short runs: a run cut into segments (partial rows)");
  check(!cu::use_short_run_backward(0, 0, 0, 5, 16), "short runs: no valid lookups");
  check(cu::short_run_backward_fits(1000, 1000, 0, 16) &&
            !cu::short_run_backward_fits(1000, 1001, 0, 16),
        "short runs: fit without the mean-run condition, only runs of one segment");

  check(cu::bad_lookup_action(-1, true) == cu::BadLookups::kNone, "bad lookups: none");
  check(cu::bad_lookup_action(0, true) == cu::BadLookups::kRaise, "bad lookups: checks on raise");
  check(cu::bad_lookup_action(7, false) == cu::BadLookups::kSkip,
        "bad lookups: checks off skip (weight gradient zero-filled)");

  // The scoring path: fp32 goes to TF32 tensor cores only where torch's float32 matmul
  // precision allows TF32 (allow_tf32), on sm_80+, up to half 1024 (streamed beyond 128).
  using In = pk::InputKind;
  using Path = pk::ScorePath;
  check(pk::choose_score_path(In::kF32, 256, 9, true) == Path::kTf32, "pk path: fp32 TF32");
  check(pk::choose_score_path(In::kF32, 256, 9, false) == Path::kPlain,
        "pk path: fp32 at precision \"highest\" stays exact");
  check(pk::choose_score_path(In::kF32, 1024, 9, true) == Path::kTf32,
        "pk path: fp32 half <= 1024 streams the query on TF32 tensor cores");
  check(pk::choose_score_path(In::kF32, 1025, 9, true) == Path::kPlain,
        "pk path: fp32 half > 1024 takes the plain path");
  check(pk::choose_score_path(In::kF32, 64, 7, true) == Path::kPlain,
        "pk path: fp32 below sm_80 takes the plain path");
  check(pk::choose_score_path(In::kF64, 64, 9, true) == Path::kPlain, "pk path: fp64 plain");
  check(pk::choose_score_path(In::kBF16, 512, 8, false) == Path::kMma16 &&
            pk::choose_score_path(In::kF16, 512, 9, true) == Path::kMma16,
        "pk path: bf16/fp16 on tensor cores whatever the fp32 setting");
  check(pk::choose_score_path(In::kBF16, 2048, 9, true) == Path::kMma16,
        "pk path: bf16 half <= 2048 streams the query on tensor cores");
  check(pk::choose_score_path(In::kF16, 2049, 9, true) == Path::kPlain,
        "pk path: fp16 half > 2048 takes the plain path");
  // 16 k-steps in registers at most (32 spilled), wider halves streamed.
  check(pk::query_mma_steps(Path::kTf32, 128) == 16 &&
            pk::query_mma_steps(Path::kTf32, 129) == pk::kStreamedQuery,
        "pk: TF32 k8-steps in registers up to half 128");
  check(pk::query_mma_steps(Path::kMma16, 513) == pk::kStreamedQuery,
        "pk: wider halves streamed from shared memory");
  check(pk::streamed_query_row_words(2048, 2) % 32 == 4 &&
            pk::streamed_query_row_words(2048, 2) == 1024 + 4 &&
            pk::streamed_query_row_words(33, 4) == 64 + 4,
        "pk: streamed query rows of whole chunks, 4 words apart mod 32");
  check(pk::query_mma_steps(Path::kMma16, 256) == 16 &&
            pk::query_mma_steps(Path::kMma16, 257) == pk::kStreamedQuery,
        "pk: bf16/fp16 k16-steps in registers up to half 256");

  // 132 SMs (H100); every size fits with the residency given.
  const int fits_all[4] = {8, 4, 2, 1};
  // 16384 tokens, 4 heads: plenty of CTAs for any size, so every size keeps 132 * 8 warps
  // busy and the smallest wins the tie.
  check(pk::choose_warps(fits_all, 132, 16384, 4, 0) == 1, "pk warps: ties go to the smallest");
  // 128 tokens, 4 heads: 32 CTAs of 1 warp or 4 of 8 keep the same 32 warps busy: a tie.
  check(pk::choose_warps(fits_all, 132, 128, 4, 0) == 1, "pk warps: few tokens, a tie");
  // One CTA per SM whatever its size (shared memory bound): bigger CTAs keep more warps busy.
  const int one_per_sm[4] = {1, 1, 1, 1};
  check(pk::choose_warps(one_per_sm, 132, 1 << 20, 4, 0) == 8,
        "pk warps: scarce residency favours big CTAs");
  const int big_do_not_fit[4] = {8, 4, 0, 0};
  check(pk::choose_warps(big_do_not_fit, 132, 1 << 20, 4, 8) == 1,
        "pk warps: a forced size that does not fit is ignored");
  check(pk::choose_warps(fits_all, 132, 1 << 20, 4, 4) == 4, "pk warps: a forced size that fits");
  const int none_fit[4] = {0, 0, 0, 0};
  check(pk::choose_warps(none_fit, 132, 1024, 4, 0) == 0, "pk warps: nothing fits");

  std::printf("%d checks, %d failed\n", g_checks, g_failed);
  return g_failed == 0 ? 0 : 1;
}

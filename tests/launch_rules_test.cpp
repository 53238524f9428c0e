// The host-side launch decisions of the CUDA ops (memory_ext/launch_rules.h and the
// launch section of csrc/cuda/pk_topk_common.cuh), checked on the CPU: vector width from
// alignment, the rows_to_dense copy unit, what happens to bad lookups, the pk_topk kernel
// and its CTA size.
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

  check(cu::dense_copy_unit(32, at(0x100), at(0x200)) == 16, "dense unit 16");
  check(cu::dense_copy_unit(24, at(0x100), at(0x200)) == 8, "dense unit 8: row of 24 bytes");
  check(cu::dense_copy_unit(32, at(0x104), at(0x200)) == 4, "dense unit 4: source 4-aligned");
  check(cu::dense_copy_unit(6, at(0x100), at(0x200)) == 2, "dense unit 2: row of 6 bytes");
  check(cu::dense_copy_unit(32, at(0x100), at(0x201)) == 1, "dense unit 1: odd destination");
  check(cu::dense_copy_unit(0, at(0x100), at(0x200)) == 16, "dense unit: empty rows");

  check(cu::bad_lookup_action(-1, true) == cu::BadLookups::kNone, "bad lookups: none");
  check(cu::bad_lookup_action(0, true) == cu::BadLookups::kRaise, "bad lookups: checks on raise");
  check(cu::bad_lookup_action(7, false) == cu::BadLookups::kSkip,
        "bad lookups: checks off skip (weight gradient zero-filled)");

  check(pk::use_tensor_cores(true, 512, 8), "pk: bf16/fp16 on sm_80 use tensor cores");
  check(!pk::use_tensor_cores(true, 513, 9), "pk: half > 512 takes the plain path");
  check(!pk::use_tensor_cores(true, 64, 7), "pk: below sm_80 takes the plain path");
  check(!pk::use_tensor_cores(false, 64, 9), "pk: fp32/fp64 take the plain path");
  check(pk::query_k16_steps(256) == 16 && pk::query_k16_steps(257) == 32, "pk: k16-steps");

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

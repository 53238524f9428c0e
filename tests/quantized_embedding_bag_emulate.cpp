// CPU emulation of the CUDA quantized_embedding_bag kernel
// (csrc/cuda/quantized_embedding_bag_kernel.cuh), for machines without a GPU. The kernel is
// compiled unchanged as host C++ against the CUDA emulation of tests/cuda_emulate.h and
// launched on grids of one and two blocks of eight warps, so the grid-stride loop over
// (bag, 128-column tile) items runs several rounds. Each case checks, bit for bit, every
// output element against the bag written out here in the kernel's order (groups of eight
// lookups, a fused multiply-add per code, the bias term summed apart and added last), with
// e4m3 codes decoded independently of memory_ext/e4m3.h (ldexp of the fields). Widths reach
// idle lanes (1, 3), row tails that are not 4-byte aligned (3, 17, 129), one and several
// tiles; bags reach a partial group of eight (1, 5, 9, 33); bad lookups add nothing and the
// lowest bad position is recorded; outputs start poisoned, so an element never written is a
// mismatch. Scales, biases and weights have full mantissas, so a different order shows.
//
// Build: g++ -std=c++20 -O2 -pthread -fno-strict-aliasing -Icsrc/include -Icsrc/cuda -Itests
//        tests/quantized_embedding_bag_emulate.cpp   (see tests/cuda_emulate.h for sanitizers)
// Run:   ./a.out   (exit status 0 when every case matches)
#include "cuda_emulate.h"  // first: the kernel below compiles against it

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "quantized_embedding_bag_kernel.cuh"

using namespace memory_ext::cuda;

namespace {

std::mt19937_64 rng(2026);

float random_float(float lo, float hi) {
  return std::uniform_real_distribution<float>(lo, hi)(rng);
}

// e4m3fn by its definition: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
// subnormal, 0x7f / 0xff are NaN.
float e4m3_by_definition(uint8_t c) {
  const int e = (c >> 3) & 15, m = c & 7;
  if (e == 15 && m == 7) return NAN;
  const float v = e == 0 ? std::ldexp(float(m), -9) : std::ldexp(float(8 + m), e - 10);
  return (c & 0x80) ? -v : v;
}

template <typename T>
uint32_t bits_of(T v) {
  uint32_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
bool same(T a, T b) {
  return bits_of(a) == bits_of(b) || (std::isnan(emu::widen(a)) && std::isnan(emu::widen(b)));
}

void put_float(uint8_t* p, float f) { std::memcpy(p, &f, 4); }

template <bool kE4M3, typename out_t>
void quantized_case(int64_t tokens, int64_t bag, int64_t dim, bool idx64, unsigned blocks,
                    const std::vector<int64_t>& bad_positions, bool report_bad) {
  const int64_t rows = 40, tail = kE4M3 ? 4 : 8, row_bytes = dim + tail;
  std::vector<uint8_t> packed(rows * row_bytes);
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* row = packed.data() + r * row_bytes;
    for (int64_t i = 0; i < dim; ++i) row[i] = static_cast<uint8_t>(rng());
    put_float(row + dim, random_float(-0.1f, 0.1f));
    if (!kE4M3) put_float(row + dim + 4, random_float(-1.0f, 1.0f));
  }
  std::vector<int64_t> idx(tokens * bag);
  for (auto& i : idx) i = static_cast<int64_t>(rng() % rows);
  // Just past either end, and far past: rows, -1, rows + 5.
  for (int64_t p : bad_positions) idx[p] = p % 3 == 0 ? rows : p % 3 == 1 ? -1 : rows + 5;
  std::vector<int32_t> idx32(idx.begin(), idx.end());
  std::vector<float> weights(tokens * bag);
  for (auto& w : weights) w = random_float(-1.0f, 1.0f);

  // The bag in the kernel's order.
  std::vector<out_t> want(tokens * dim);
  int64_t want_bad = -1;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < dim; ++i) {
      float acc = -0.0f, bias_sum = 0.0f;
      for (int64_t j0 = 0; j0 < bag; j0 += kQuantRowsInFlight)
        for (int q = 0; q < kQuantRowsInFlight; ++q) {
          const int64_t j = j0 + q, pos = t * bag + j;
          const int64_t r = j < bag ? idx[pos] : -1;
          const bool valid = j < bag && r >= 0 && r < rows;
          if (j < bag && !valid && (want_bad < 0 || pos < want_bad)) want_bad = pos;
          const uint8_t* row = valid ? packed.data() + r * row_bytes : nullptr;
          float scale = 0.0f, bias = 0.0f;
          if (valid) std::memcpy(&scale, row + dim, 4);
          if (valid && !kE4M3) std::memcpy(&bias, row + dim + 4, 4);
          const float factor = valid ? weights[pos] * scale : -0.0f;
          if (valid && !kE4M3) bias_sum = std::fmaf(weights[pos], bias, bias_sum);
          const uint8_t code = valid ? row[i] : 0;
          acc = std::fmaf(factor, kE4M3 ? e4m3_by_definition(code) : float(code), acc);
        }
      want[t * dim + i] = emu::from_float<out_t>(kE4M3 ? acc : acc + bias_sum);
    }

  std::vector<out_t> out(tokens * dim);
  emu::poison(out);
  unsigned long long first_bad = ~0ull;
  QuantizedBagArgs a{};
  a.packed = packed.data();
  a.indices = idx64 ? static_cast<const void*>(idx.data()) : static_cast<const void*>(idx32.data());
  a.weights = weights.data();
  a.out = out.data();
  a.first_bad = report_bad ? &first_bad : nullptr;
  a.tokens = tokens;
  a.bag = bag;
  a.rows = rows;
  a.row_bytes = row_bytes;
  a.dim = dim;
  a.idx64 = idx64;
  a.has_bias = !kE4M3;
  emu::launch(blocks, kQuantBlock, &quantized_bag_kernel<kE4M3, out_t>, a);

  std::string bad;
  for (int64_t at = 0; at < tokens * dim && bad.empty(); ++at)
    if (!same(out[at], want[at]))
      bad = "element " + std::to_string(at) + " (token " + std::to_string(at / dim) + ", column " +
            std::to_string(at % dim) + ")";
  if (bad.empty() && report_bad) {
    const int64_t got = first_bad == ~0ull ? -1 : static_cast<int64_t>(first_bad);
    if (got != want_bad)
      bad = "first_bad " + std::to_string(got) + ", want " + std::to_string(want_bad);
  }
  char name[200];
  std::snprintf(
      name, sizeof name, "quantized %s -> %s, dim %lld, %lld x %lld, %s indices, %u blocks%s",
      kE4M3 ? "e4m3" : "uint8", emu::type_name<out_t>(), static_cast<long long>(dim),
      static_cast<long long>(tokens), static_cast<long long>(bag), idx64 ? "int64" : "int32",
      blocks,
      bad_positions.empty() ? ""
                            : (report_bad ? ", bad lookups reported" : ", bad lookups skipped"));
  emu::report(bad.empty(), name, bad);
}

template <bool kE4M3>
void quantized_cases() {
  // 1, 3: idle lanes; 3, 17, 129: scale and bias not 4-byte aligned; 128: one whole tile;
  // 129, 300: a second and third tile. Bags: 1 and 5 (one partial group of eight), 8, 9
  // and 33 (whole groups and one lookup more).
  int n = 0;
  for (int64_t dim : {1, 3, 4, 17, 128, 129, 300})
    for (int64_t bag : {1, 5, 8, 9, 33}) {
      quantized_case<kE4M3, float>(3, bag, dim, n % 2 == 0, 1 + n % 2, {}, false);
      ++n;
    }
  for (int64_t dim : {17, 129}) {
    quantized_case<kE4M3, __nv_bfloat16>(3, 9, dim, true, 2, {}, false);
    quantized_case<kE4M3, __half>(3, 9, dim, false, 1, {}, false);
  }
  // Bad lookups: they add nothing; with the check on, the lowest bad position is recorded.
  quantized_case<kE4M3, float>(4, 9, 40, true, 2, {30, 7, 12}, true);
  quantized_case<kE4M3, float>(4, 9, 40, false, 1, {30, 7, 12}, false);
  // Many tokens: every warp of two blocks takes several items.
  quantized_case<kE4M3, float>(40, 5, 300, true, 2, {}, false);
}

}  // namespace

int main() {
  quantized_cases<false>();
  quantized_cases<true>();
  return emu::summary();
}

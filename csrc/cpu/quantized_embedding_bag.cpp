// CPU kernel of quantized_embedding_bag: the weighted bag of row-wise quantized rows
// (inference tables of uint8 codes with a scale and bias per row, or float8 e4m3 codes with
// a scale per row), dequantized on the fly and accumulated in float32.
//
// A row's value is scale[r] * code + bias[r], so a bag is
//   sum_j w_j * (s_j * code_j + b_j) = sum_j (w_j * s_j) * code_j + sum_j w_j * b_j:
// the codes are summed with per-row factors w_j * s_j exactly as the float gather sums rows
// (the same two strategies and primitives, csrc/cpu/row_math.h), and the bias term is one
// scalar per bag added at the end. The scale and bias sit at the end of their row's codes,
// so a lookup is one contiguous read (a separate scale array would add one or two more
// cache misses per lookup, which a gather bound by misses in flight pays for in full).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "large_buffers.h"
#include "memory_ext/checks.h"
#include "memory_ext/prologues.h"
#include "row_dispatch.h"

namespace memory_ext {
namespace {

// Rows of codes whose length is a multiple of kRegisterChunk and at most kRegisterRowBytes
// are summed a chunk at a time with the chunk's running sums in registers (16 zmm
// registers hold 256 floats); other lengths read kRowsInFlight rows side by side.
constexpr int kRegisterChunk = 256;
constexpr int64_t kRegisterRowBytes = 4096;
constexpr int kRowsInFlight = 16;
// Rows are prefetched this many lookups ahead of their use. With the AVX-512 widening of
// byte codes (row_math.h) a row costs less arithmetic, and prefetches 16 lookups ahead no
// longer covered DRAM's latency: at rows of 520 bytes (dim 512 uint8, 2^20 rows, 4096 x
// 128 lookups, 2-core Xeon) 16 -> 64 lookups took the bag from 19.5 to 16-18 ms, 32 gained
// half of that, 128 and 256 no more than 64, and a whole-row prefetch on the first chunk's
// pass instead lost 1-2 ms.
constexpr int64_t kAheadLookups = 64;

inline float load_float(const uint8_t* p) {
  float f;
  std::memcpy(&f, p, sizeof(f));  // row tails are not 4-byte aligned for every dim
  return f;
}

// The kernel's inputs as raw pointers, and the index check every lookup goes through. R is
// uint8_t or cpu::e4m3_bits; out_t the output dtype.
template <typename R, typename out_t, typename index_t>
struct QuantizedBag {
  const uint8_t* packed;
  const index_t* indices;
  const float* weights;
  out_t* out;
  int64_t rows, row_bytes, dim, bag;
  bool has_bias;

  int64_t checked_row(int64_t pos) const {
    const index_t r = indices[pos];
    if (r < 0 || r >= rows) fail_index_out_of_range("quantized_embedding_bag", pos, bag, r, rows);
    return static_cast<int64_t>(r);
  }
  const uint8_t* row_start(int64_t r) const { return packed + r * row_bytes; }
  // The row of lookup pos for a prefetch: null past end or for a bad index (which the
  // lookup itself reports).
  const uint8_t* row_or_null(int64_t pos, int64_t end) const {
    if (pos >= end) return nullptr;
    const index_t r = indices[pos];
    return r < 0 || r >= rows ? nullptr : row_start(static_cast<int64_t>(r));
  }
  // The scale (and bias) of every lookup of bag t: gather_bag reads them all at the bag's
  // start. For a task's first bag only: a later bag finds the tails of its first
  // kAheadLookups lookups fetched with those rows' last chunk and loads the rest as it starts
  // (a burst of prefetches for each whole next bag measured no faster).
  void prefetch_tails(int64_t t, int64_t end) const {
    for (int64_t pos = t * bag; pos < std::min(end, (t + 1) * bag); ++pos)
      if (const uint8_t* r = row_or_null(pos, end))
        cpu::prefetch_row<cpu::PrefetchTo::L2>(r + dim, row_bytes - dim);
  }
  static const R* codes_of(const uint8_t* row) { return reinterpret_cast<const R*>(row); }

  // The bag of token t as code pointers and per-row factors w * scale (in lookup order);
  // returns its bias term sum_j w_j * bias[r_j], summed in lookup order.
  float gather_bag(int64_t t, const R** codes, float* factor) const {
    float bias_sum = 0.0f;
    for (int64_t j = 0; j < bag; ++j) {
      const int64_t pos = t * bag + j;
      const uint8_t* row = row_start(checked_row(pos));
      const float w = weights[pos];
      codes[j] = codes_of(row);
      factor[j] = w * load_float(row + dim);
      if (has_bias) bias_sum += w * load_float(row + dim + 4);
    }
    return bias_sum;
  }

  // acc (+ the bias term) rounded once into bag t's output row; acc is the caller's scratch.
  void store(int64_t t, float* acc, float bias_sum) const {
    // Without a bias nothing is added: -0 + 0 would turn a bag of -0 rows into +0.
    if (has_bias)
      for (int64_t i = 0; i < dim; ++i) acc[i] += bias_sum;
    cpu::row_store(out + t * dim, acc, dim);
  }
};

template <int C, typename R, typename out_t, typename index_t>
void bags_in_registers(const QuantizedBag<R, out_t, index_t>& d, int64_t tokens) {
  const int64_t bag = d.bag;
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    std::vector<const R*> codes(bag), ahead(bag);
    std::vector<float> factor(bag), acc(d.dim, 0.0f);
    const int64_t end = t1 * bag;
    d.prefetch_tails(t0, end);
    for (int64_t p = t0 * bag; p < std::min(end, t0 * bag + kAheadLookups); ++p)
      if (const uint8_t* r = d.row_or_null(p, end))
        cpu::prefetch_row<cpu::PrefetchTo::L2>(r, d.row_bytes);
    for (int64_t t = t0; t < t1; ++t) {
      const float bias_sum = d.gather_bag(t, codes.data(), factor.data());
      for (int64_t j = 0; j < bag; ++j) {
        const uint8_t* r = d.row_or_null(t * bag + j + kAheadLookups, end);
        ahead[j] = r == nullptr ? nullptr : d.codes_of(r);
      }
      for (int64_t c = 0; bag > 0 && c < d.dim; c += C) {
        // The last chunk's prefetch runs on to the row's end: its scale and bias.
        const int64_t ahead_bytes = c + C < d.dim ? C : d.row_bytes - c;
        cpu::bag_sum<C>(acc.data() + c, codes.data(), factor.data(), ahead.data(), ahead_bytes, bag,
                        c);
      }
      d.store(t, acc.data(), bias_sum);
    }
  });
}

template <typename R, typename out_t, typename index_t>
void bags_rows_in_flight(const QuantizedBag<R, out_t, index_t>& d, int64_t tokens) {
  const int64_t bag = d.bag, dim = d.dim;
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    std::vector<const R*> codes(bag);
    std::vector<float> factor(bag), acc(std::max<int64_t>(dim, 1));
    const int64_t end = t1 * bag;
    auto prefetch = [&](int64_t pos) {
      if (const uint8_t* r = d.row_or_null(pos, end))
        cpu::prefetch_row<cpu::PrefetchTo::L2>(r, d.row_bytes);
    };
    d.prefetch_tails(t0, end);
    for (int64_t p = t0 * bag; p < std::min(end, t0 * bag + kAheadLookups); ++p) prefetch(p);
    for (int64_t t = t0; t < t1; ++t) {
      const float bias_sum = d.gather_bag(t, codes.data(), factor.data());
      d.prefetch_tails(t + 1, end);
      auto add_rows = [&](auto n_rows, int64_t j) {
        constexpr int N = decltype(n_rows)::value;
        for (int q = 0; q < N; ++q) prefetch(t * bag + j + kAheadLookups + q);
        if (j == 0)
          cpu::row_axpy_n<N, true>(acc.data(), codes.data() + j, factor.data() + j, dim);
        else
          cpu::row_axpy_n<N, false>(acc.data(), codes.data() + j, factor.data() + j, dim);
      };
      int64_t j = 0;
      for (; j + kRowsInFlight <= bag; j += kRowsInFlight)
        add_rows(std::integral_constant<int, kRowsInFlight>{}, j);
      for (; j + 4 <= bag; j += 4) add_rows(std::integral_constant<int, 4>{}, j);
      for (; j < bag; ++j) add_rows(std::integral_constant<int, 1>{}, j);
      if (bag == 0) std::fill(acc.begin(), acc.end(), 0.0f);
      d.store(t, acc.data(), bias_sum);
    }
  });
}

template <typename R, typename out_t, typename index_t>
void quantized_bag_impl(const QuantizedBag<R, out_t, index_t>& d, int64_t tokens) {
  switch (d.dim) {
    case 16:
      return bags_in_registers<16>(d, tokens);
    case 32:
      return bags_in_registers<32>(d, tokens);
    case 64:
      return bags_in_registers<64>(d, tokens);
    case 128:
      return bags_in_registers<128>(d, tokens);
    default:
      if (d.dim % kRegisterChunk == 0 && d.dim * int64_t(sizeof(R)) <= kRegisterRowBytes)
        return bags_in_registers<kRegisterChunk>(d, tokens);
      return bags_rows_in_flight(d, tokens);
  }
}

// check_indices is not read: the CPU kernel checks each index as it reads it.
at::Tensor quantized_embedding_bag_cpu(const at::Tensor& packed_, const at::Tensor& indices_,
                                       const at::Tensor& weights_, c10::string_view codes,
                                       c10::ScalarType out_dtype, bool /*check_indices*/) {
  check_quantized_embedding_bag_args(packed_, indices_, weights_, codes, out_dtype);
  const auto [packed, indices, weights, dim, tail] =
      quantized_bag_inputs(packed_, indices_, weights_, codes);
  auto out = cpu::empty_large({indices.size(0), dim}, packed.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  auto run = [&]<typename R>() {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, out_dtype, "quantized_embedding_bag", [&] {
          using out_t = scalar_t;
          AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "quantized_embedding_bag", [&] {
            const QuantizedBag<R, out_t, index_t> d{packed.const_data_ptr<uint8_t>(),
                                                    indices.const_data_ptr<index_t>(),
                                                    weights.const_data_ptr<float>(),
                                                    out.mutable_data_ptr<out_t>(),
                                                    packed.size(0),
                                                    packed.size(1),
                                                    dim,
                                                    indices.size(1),
                                                    tail == 8};
            quantized_bag_impl(d, indices.size(0));
          });
        });
  };
  if (tail == 8)
    run.template operator()<uint8_t>();
  else
    run.template operator()<cpu::e4m3_bits>();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(memory, CPU, m) {
  m.impl("quantized_embedding_bag", &quantized_embedding_bag_cpu);
}

}  // namespace memory_ext

// Benchmark of the CUDA embedding_bag forward and sparse backward, called through the
// dispatcher like Python calls them, next to a device-to-device copy measured in the same
// run (the bandwidth ceiling) and torch's own embedding_bag forward (the peer).
//
// Timing: CUDA events around each call on the current stream, warm-up first, median of
// many calls. Inputs are random (never zeros) and far larger than L2 (the table alone is
// rows * dim * 2 bytes). Bytes per call count what each op must move at least, with e the
// value size, i the index size and w the weight size (reads of rows a lookup shares with
// an earlier one are counted again: the rows are random over a large table, so they
// rarely hit a cache):
//   forward:  lookups * dim * e (rows read) + tokens * dim * e (output) + lookups * (i + w)
//   backward: lookups * dim * e (grad_out rows gathered) + 2 * unique * dim * e (value rows
//             read, row gradients written) + lookups * (i + w + w) (indices, weights,
//             weight gradients) + unique * 8 (row ids)
//
//   bench_embedding_bag [out.json] [--rows N] [--dims 1024,4096] [--bag 128]
//                       [--tokens 16384,32768,65536] [--iters 20] [--warmup 3] [--json FILE]
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_timer.h"

namespace {

struct Options {
  int64_t rows = int64_t(1) << 20;
  std::vector<int64_t> dims{1024, 4096};
  int64_t bag = 128;
  std::vector<int64_t> tokens{16384, 32768, 65536};
  int iters = 20;
  int warmup = 3;
  std::string json;
};

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(std::stoll(item));
  return out;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "missing value after %s\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--rows")
      o.rows = std::stoll(next());
    else if (a == "--dims")
      o.dims = parse_list(next());
    else if (a == "--bag")
      o.bag = std::stoll(next());
    else if (a == "--tokens")
      o.tokens = parse_list(next());
    else if (a == "--iters")
      o.iters = std::stoi(next());
    else if (a == "--warmup")
      o.warmup = std::stoi(next());
    else if (a == "--json")
      o.json = next();
    else if (a.rfind("--", 0) != 0 && o.json.empty())
      o.json = a;  // like bench_pk_topk: out.json first
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      std::exit(2);
    }
  }
  return o;
}

using bench::median_ms;

struct Row {
  std::string op;
  int64_t dim, tokens, unique;
  double ms, gbps, copy_gbps;
};

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  // The ops come from the objects linked into this executable; finding them first
  // proves the registrations are there even without a GPU.
  auto& dispatcher = c10::Dispatcher::singleton();
  const auto fwd_op = dispatcher.findSchemaOrThrow("memory::embedding_bag", "");
  const auto bwd_op = dispatcher.findSchemaOrThrow("memory::embedding_bag_backward", "");
  if (!fwd_op.hasKernelForDispatchKey(c10::DispatchKey::CUDA) ||
      !bwd_op.hasKernelForDispatchKey(c10::DispatchKey::CUDA)) {
    std::fprintf(stderr, "bench_embedding_bag: the CUDA kernels are not registered\n");
    return 1;
  }
  auto fwd = fwd_op.typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  auto bwd = bwd_op.typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  auto set_checks =
      dispatcher.findSchemaOrThrow("memory::set_index_checks", "").typed<void(bool)>();
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    std::fprintf(stderr, "bench_embedding_bag: no CUDA device visible\n");
    return 2;
  }
  cudaDeviceProp prop{};
  bench::check_cuda(cudaGetDeviceProperties(&prop, 0), "properties");
  const c10::cuda::CUDAGuard guard(0);

  // Indices are valid by construction; time the kernels, not the validation sync.
  set_checks.call(false);

  const auto dev = at::TensorOptions().device(at::kCUDA, 0);
  const at::ScalarType vt = at::kBFloat16;
  const int64_t e = 2;

  // Copy ceiling: 1 GiB device-to-device, bytes read + written.
  at::Tensor copy_src = at::randn({int64_t(1) << 29}, dev.dtype(vt));
  at::Tensor copy_dst = at::empty_like(copy_src);
  const double copy_ms = median_ms([&] { copy_dst.copy_(copy_src); }, o.warmup, o.iters);
  const double copy_gbps = 2.0 * copy_src.numel() * e / (copy_ms * 1e6);
  copy_src.reset();
  copy_dst.reset();

  std::printf("device: %s, copy %.0f GB/s\n", prop.name, copy_gbps);
  std::printf("%-20s %6s %7s %9s %9s %9s %8s\n", "op", "dim", "tokens", "unique", "ms", "GB/s",
              "vs copy");
  std::vector<Row> rows_out;
  auto report = [&](const Row& r) {
    std::printf("%-20s %6lld %7lld %9lld %9.3f %9.0f %7.0f%%\n", r.op.c_str(), (long long)r.dim,
                (long long)r.tokens, (long long)r.unique, r.ms, r.gbps, 100.0 * r.gbps / copy_gbps);
    std::fflush(stdout);
    rows_out.push_back(r);
  };

  for (const int64_t dim : o.dims) {
    at::Tensor values = at::randn({o.rows, dim}, dev.dtype(vt));
    for (const int64_t tokens : o.tokens) {
      const int64_t n = tokens * o.bag;
      at::Tensor indices = at::randint(0, o.rows, {tokens, o.bag}, dev.dtype(at::kLong));
      at::Tensor weights = at::randn({tokens, o.bag}, dev.dtype(at::kFloat));
      at::Tensor grad_out = at::randn({tokens, dim}, dev.dtype(vt));

      const double f_ms = median_ms([&] { fwd.call(values, indices, weights); }, o.warmup, o.iters);
      const double f_bytes = double(n) * dim * e + double(tokens) * dim * e + double(n) * (8 + 4);
      report({"memory.embedding_bag", dim, tokens, 0, f_ms, f_bytes / (f_ms * 1e6), copy_gbps});

      int64_t unique = 0;
      const double b_ms = median_ms(
          [&] { unique = std::get<0>(bwd.call(grad_out, values, indices, weights, true)).size(0); },
          o.warmup, o.iters);
      const double b_bytes =
          double(n) * dim * e + 2.0 * unique * dim * e + double(n) * (8 + 4 + 4) + unique * 8.0;
      report({"memory.eb_backward", dim, tokens, unique, b_ms, b_bytes / (b_ms * 1e6), copy_gbps});

      // Peer: torch's embedding_bag (sum, per-sample weights in the table's dtype).
      at::Tensor flat = indices.reshape({-1});
      at::Tensor offsets = at::arange(0, n, o.bag, dev.dtype(at::kLong));
      at::Tensor psw = weights.reshape({-1}).to(vt);
      const double t_ms =
          median_ms([&] { at::embedding_bag(values, flat, offsets, false, 0, false, psw, false); },
                    o.warmup, o.iters);
      report({"torch.embedding_bag", dim, tokens, 0, t_ms, f_bytes / (t_ms * 1e6), copy_gbps});
    }
  }
  set_checks.call(true);

  if (!o.json.empty()) {
    std::ofstream f(o.json);
    f << "{\"device\": \"" << prop.name << "\", \"copy_gbps\": " << copy_gbps
      << ", \"rows\": " << o.rows << ", \"bag\": " << o.bag
      << ", \"dtype\": \"bfloat16\", \"results\": [";
    for (size_t i = 0; i < rows_out.size(); ++i) {
      const Row& r = rows_out[i];
      f << (i ? ", " : "") << "{\"op\": \"" << r.op << "\", \"dim\": " << r.dim
        << ", \"tokens\": " << r.tokens << ", \"unique\": " << r.unique << ", \"ms\": " << r.ms
        << ", \"gbps\": " << r.gbps << ", \"fraction_of_copy\": " << r.gbps / copy_gbps << "}";
    }
    f << "]}\n";
  }
  return 0;
}

// The weighted gather's benchmark cases, for any device: memory::embedding_bag, its sparse
// backward and rows_to_dense, each next to torch's own op doing the same work, at
// bench/bench_embedding_bag.py's shapes (CPU: tokens 4096, bag 128, rows 2^20, dim 512,
// float32 and bfloat16; CUDA: tokens 16384-65536, dims 1024 and 4096, bfloat16), so the C++
// and the Python number of a case can be put side by side.
//
// Cases, "impl/op/dtype/dim:D/tokens:T":
//   forward          memory::embedding_bag | at::embedding_bag (sum, per-sample weights)
//   backward_sparse  memory::embedding_bag_backward (rows, row gradients, weight gradients)
//                    | at::_embedding_bag_backward(sparse=true) plus
//                    at::_embedding_bag_per_sample_weights_backward: what autograd runs for
//                    F.embedding_bag(..., sparse=True)
//   fwd_bwd_sparse   the two above, one after the other
//   rows_to_dense    memory::rows_to_dense of the backward's rows | zeros + index_copy_
// Bytes per call are the least each must move (bench/bench_embedding_bag.py's counts; a
// row two lookups share is counted twice: the rows are random over a large table):
//   forward:  lookups * dim * e + tokens * dim * e + lookups * (8 + 4)
//   backward: lookups * dim * e + 2 * unique * dim * e + lookups * (8 + 4 + 4)
//   rows_to_dense: n_rows * dim * e (written) + unique * (dim * e + 8) (read)
// Options: --rows N --dims D,.. --bag B --tokens T,.. --dtypes float32,bfloat16
#pragma once

#include <memory>
#include <tuple>

#include "bench_harness.h"
#include "memory_ops.h"

namespace bench {

namespace embedding_bag_detail {

struct Inputs {
  at::Tensor values, indices, weights, grad_out;
  int64_t unique = 0;
};

struct Shape {
  at::ScalarType dtype;
  int64_t rows, dim, tokens, bag;
  bool operator==(const Shape& o) const {
    return dtype == o.dtype && rows == o.rows && dim == o.dim && tokens == o.tokens && bag == o.bag;
  }
};

// The inputs of the case running now, drawn on the device on first use; one shape is held
// at a time (the cases of a shape run one after another), so the tables of other shapes
// are not resident.
inline const Inputs& inputs_for(const Run& run, const Shape& s) {
  static std::unique_ptr<Inputs> held;
  static Shape held_shape{};
  if (!held || !(held_shape == s)) {
    held.reset();
    at::manual_seed(0);
    auto in = std::make_unique<Inputs>();
    in->values = table_storage({s.rows, s.dim}, run.options(s.dtype)).normal_();
    in->indices = at::randint(0, s.rows, {s.tokens, s.bag}, run.options(at::kLong));
    in->weights = at::randn({s.tokens, s.bag}, run.options(at::kFloat));
    in->grad_out = at::randn({s.tokens, s.dim}, run.options(s.dtype));
    in->unique = std::get<0>(at::_unique(in->indices)).numel();
    held = std::move(in);
    held_shape = s;
  }
  return *held;
}

// What torch's autograd keeps from the forward for the sparse backward.
struct TorchForward {
  at::Tensor flat, offsets, psw, offset2bag, bag_size, max_indices;
};

inline void torch_forward_into(const Inputs& in, TorchForward& f) {
  auto out = at::_embedding_bag(in.values, f.flat, f.offsets, false, 0, true, f.psw);
  f.offset2bag = std::get<1>(out);
  f.bag_size = std::get<2>(out);
  f.max_indices = std::get<3>(out);
}

inline TorchForward torch_forward(const Inputs& in) {
  TorchForward f;
  const int64_t tokens = in.indices.size(0), bag = in.indices.size(1);
  f.flat = in.indices.reshape({-1});
  f.offsets = at::arange(0, tokens * bag, bag, in.indices.options());
  f.psw = in.weights.reshape({-1}).to(in.values.scalar_type());  // torch wants the table's dtype
  torch_forward_into(in, f);
  return f;
}

inline void torch_backward_sparse(const Inputs& in, const TorchForward& f) {
  auto grad = at::_embedding_bag_backward(in.grad_out, f.flat, f.offsets, f.offset2bag, f.bag_size,
                                          f.max_indices, in.values.size(0), false, 0, true, f.psw);
  auto wgrad = at::_embedding_bag_per_sample_weights_backward(in.grad_out, in.values, f.flat,
                                                              f.offsets, f.offset2bag, 0);
  benchmark::DoNotOptimize(grad);
  benchmark::DoNotOptimize(wgrad);
}

}  // namespace embedding_bag_detail

inline void register_embedding_bag_cases(Options& o, const Run& run) {
  using namespace embedding_bag_detail;
  const bool q = run.quick, cuda = run.device.is_cuda();
  const int64_t rows = o.integer("rows", q ? 4096 : int64_t(1) << 20);
  const auto dims =
      o.integers("dims", q ? std::vector<int64_t>{64}
                           : (cuda ? std::vector<int64_t>{1024, 4096} : std::vector<int64_t>{512}));
  const int64_t bag = o.integer("bag", q ? 16 : 128);
  const auto tokens_list = o.integers(
      "tokens",
      q ? std::vector<int64_t>{64}
        : (cuda ? std::vector<int64_t>{16384, 32768, 65536} : std::vector<int64_t>{4096}));
  const auto dtypes = o.texts("dtypes", cuda ? std::vector<std::string>{"bfloat16"}
                                             : std::vector<std::string>{"float32", "bfloat16"});
  const MemoryOps ops =
      MemoryOps::find(run.device.is_cuda() ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU);

  for (const std::string& dt : dtypes) {
    const at::ScalarType dtype = dtype_named(dt);
    const int64_t e = c10::elementSize(dtype);
    for (const int64_t dim : dims) {
      for (const int64_t tokens : tokens_list) {
        const Shape shape{dtype, rows, dim, tokens, bag};
        const double lookups = double(tokens) * bag;
        const double fwd_bytes = lookups * dim * e + double(tokens) * dim * e + lookups * (8 + 4);
        auto bwd_bytes = [=](const Inputs& in) {
          return lookups * dim * e + 2.0 * in.unique * dim * e + lookups * (8 + 4 + 4);
        };
        auto dense_bytes = [=](const Inputs& in) {
          return double(rows) * dim * e + double(in.unique) * (dim * e + 8);
        };
        auto add = [&](const char* impl, const char* op,
                       std::function<void(benchmark::State&)> fn) {
          add_case(run, case_name({impl, op, dt, kv("dim", dim), kv("tokens", tokens)}),
                   std::move(fn));
        };
        add("memory_ext", "forward", [=](benchmark::State& st) {
          const Inputs& in = inputs_for(run, shape);
          run.loop(st, [&] {
            benchmark::DoNotOptimize(
                ops.embedding_bag.call(in.values, in.indices, in.weights, true));
          });
          report(st, {fwd_bytes, double(tokens)});
        });
        add("torch", "forward", [=](benchmark::State& st) {
          const Inputs& in = inputs_for(run, shape);
          const TorchForward f = torch_forward(in);
          run.loop(st, [&] {
            benchmark::DoNotOptimize(
                at::embedding_bag(in.values, f.flat, f.offsets, false, 0, false, f.psw));
          });
          report(st, {fwd_bytes, double(tokens)});
        });
        add("memory_ext", "backward_sparse", [=](benchmark::State& st) {
          const Inputs& in = inputs_for(run, shape);
          run.loop(st, [&] {
            benchmark::DoNotOptimize(ops.embedding_bag_backward.call(in.grad_out, in.values,
                                                                     in.indices, in.weights, true));
          });
          report(st, {bwd_bytes(in), double(tokens)});
        });
        add("torch", "backward_sparse", [=](benchmark::State& st) {
          const Inputs& in = inputs_for(run, shape);
          const TorchForward f = torch_forward(in);
          run.loop(st, [&] { torch_backward_sparse(in, f); });
          report(st, {bwd_bytes(in), double(tokens)});
        });
        add("memory_ext", "fwd_bwd_sparse", [=](benchmark::State& st) {
          const Inputs& in = inputs_for(run, shape);
          run.loop(st, [&] {
            benchmark::DoNotOptimize(
                ops.embedding_bag.call(in.values, in.indices, in.weights, true));
            benchmark::DoNotOptimize(ops.embedding_bag_backward.call(in.grad_out, in.values,
                                                                     in.indices, in.weights, true));
          });
          report(st, {fwd_bytes + bwd_bytes(in), double(tokens)});
        });
        add("torch", "fwd_bwd_sparse", [=](benchmark::State& st) {
          const Inputs& in = inputs_for(run, shape);
          TorchForward f = torch_forward(in);
          run.loop(st, [&] {
            torch_forward_into(in, f);
            torch_backward_sparse(in, f);
          });
          report(st, {fwd_bytes + bwd_bytes(in), double(tokens)});
        });
        add("memory_ext", "rows_to_dense", [=](benchmark::State& st) {
          const Inputs& in = inputs_for(run, shape);
          auto [r, g, w] = ops.embedding_bag_backward.call(in.grad_out, in.values, in.indices,
                                                           in.weights, false);
          run.loop(st, [&] {
            benchmark::DoNotOptimize(ops.rows_to_dense.call(r, g, c10::SymInt(rows), false));
          });
          report(st, {dense_bytes(in), 0});
        });
        add("torch", "rows_to_dense", [=](benchmark::State& st) {
          const Inputs& in = inputs_for(run, shape);
          auto [r, g, w] = ops.embedding_bag_backward.call(in.grad_out, in.values, in.indices,
                                                           in.weights, false);
          run.loop(st, [&] {
            benchmark::DoNotOptimize(at::zeros({rows, dim}, g.options()).index_copy_(0, r, g));
          });
          report(st, {dense_bytes(in), 0});
        });
      }
    }
  }
}

}  // namespace bench

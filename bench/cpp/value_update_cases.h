// The value update's benchmark cases, for any device: the row optimizers (memory::row_adam_,
// memory::row_adagrad_) and of a whole value step built from the ops (embedding_bag, its sparse
// backward, the row update), at bench/bench_value_update.py's shape: a 2^20 x 256 float32 table,
// 4096 tokens x 64 rows. The peers do the same work with ATen ops:
//   row_adam     memory::row_adam_ | lazy AdamW on the same rows from index_select, ATen
//                arithmetic and index_copy_ (what a sparse Adam computes)
//   row_adagrad  memory::row_adagrad_ | the same row-wise Adagrad from ATen ops
//   dense_adamw  torch's fused AdamW (at::_fused_adamw_) over the whole table with a dense
//                gradient: what AdamW(model.parameters()) costs; no memory_ext row, it is
//                the cost the row update avoids, not a like-for-like peer
//   step_adam, step_adagrad   forward + sparse backward + row update, memory_ext ops only;
//                the Python benchmark's memory_ext sparse step adds autograd and Python
// Bytes per call are the least each must move, with U rows touched and e = 4:
//   row_adam:    U * dim * (3 * 2 * e + e)  (param and both moments read and written,
//                gradient read); dense_adamw the same over every row
//   row_adagrad: U * dim * (2 * e + e) + U * 2 * 4 (sum_sq read and written)
//   step_adam: 2 * lookups * dim * e + U * dim * e * 7 (bench_value_update.py's count)
//   step_adagrad: 2 * lookups * dim * e + U * (dim * e * 4 + 8)
//
// Cases, "impl/op/float32/rows:N/dim:D/tokens:T".
// Options: --rows N --dim D --tokens T --bag B
#pragma once

#include <cmath>
#include <functional>
#include <memory>
#include <tuple>

#include "bench_harness.h"
#include "memory_ops.h"

namespace bench {

namespace value_update_detail {

constexpr double kLr = 1e-3, kBeta1 = 0.9, kBeta2 = 0.95, kEps = 1e-8, kWeightDecay = 0.0;

struct Table {
  at::Tensor param, exp_avg, exp_avg_sq, sum_sq;
  at::Tensor indices, weights, grad_out;
  at::Tensor rows, rows_grad;  // the sparse gradient of one backward
  int64_t step = 0;
};

// One table per process, drawn on first use.
inline Table& table_for(const Run& run, int64_t n_rows, int64_t dim, int64_t tokens, int64_t bag) {
  static std::unique_ptr<Table> held;
  if (!held) {
    at::manual_seed(0);
    const auto f32 = run.options(at::kFloat);
    auto t = std::make_unique<Table>();
    t->param = table_storage({n_rows, dim}, f32).normal_(0.0, 1.0 / std::sqrt(double(dim)));
    t->exp_avg = table_storage({n_rows, dim}, f32).zero_();
    t->exp_avg_sq = table_storage({n_rows, dim}, f32).zero_();
    t->sum_sq = table_storage({n_rows}, f32).zero_();
    t->indices = at::randint(0, n_rows, {tokens, bag}, run.options(at::kLong));
    t->weights = at::softmax(at::randn({tokens, bag}, f32), -1);
    t->grad_out = at::randn({tokens, dim}, f32);
    held = std::move(t);
  }
  return *held;
}

inline void torch_row_adam(Table& t) {
  t.step += 1;
  const at::Tensor p = t.param.index_select(0, t.rows);
  at::Tensor m = t.exp_avg.index_select(0, t.rows);
  at::Tensor v = t.exp_avg_sq.index_select(0, t.rows);
  const at::Tensor& g = t.rows_grad;
  m.mul_(kBeta1).add_(g, 1 - kBeta1);
  v.mul_(kBeta2).addcmul_(g, g, 1 - kBeta2);
  const double bc1 = 1 - std::pow(kBeta1, double(t.step));
  const double bc2 = 1 - std::pow(kBeta2, double(t.step));
  const at::Tensor denom = (v.sqrt() / std::sqrt(bc2)).add_(kEps);
  const at::Tensor updated = (p * (1 - kLr * kWeightDecay)).addcdiv_(m, denom, -kLr / bc1);
  t.param.index_copy_(0, t.rows, updated);
  t.exp_avg.index_copy_(0, t.rows, m);
  t.exp_avg_sq.index_copy_(0, t.rows, v);
}

inline void torch_row_adagrad(Table& t) {
  const at::Tensor& g = t.rows_grad;
  const at::Tensor s = t.sum_sq.index_select(0, t.rows) + g.square().mean(-1);
  const at::Tensor p = t.param.index_select(0, t.rows);
  const at::Tensor updated =
      (p * (1 - kLr * kWeightDecay)) - kLr * g / (s.sqrt().add(kEps).unsqueeze(-1));
  t.param.index_copy_(0, t.rows, updated);
  t.sum_sq.index_copy_(0, t.rows, s);
}

}  // namespace value_update_detail

inline void register_value_update_cases(Options& o, const Run& run) {
  using namespace value_update_detail;
  const bool q = run.quick;
  const int64_t n_rows = o.integer("rows", q ? 8192 : int64_t(1) << 20);
  const int64_t dim = o.integer("dim", q ? 64 : 256);
  const int64_t tokens = o.integer("tokens", q ? 64 : 4096);
  const int64_t bag = o.integer("bag", q ? 16 : 64);
  const MemoryOps ops =
      MemoryOps::find(run.device.is_cuda() ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU);
  const double e = 4, lookups = double(tokens) * bag;

  auto name = [&](const char* impl, const char* op) {
    return case_name(
        {impl, op, "float32", kv("rows", n_rows), kv("dim", dim), kv("tokens", tokens)});
  };
  // The table with one sparse gradient, for the cases that time the update alone.
  auto with_gradient = [=]() -> Table& {
    Table& t = table_for(run, n_rows, dim, tokens, bag);
    if (!t.rows.defined()) {
      auto [r, g, w] =
          ops.embedding_bag_backward.call(t.grad_out, t.param, t.indices, t.weights, false);
      t.rows = r;
      t.rows_grad = g;
    }
    return t;
  };
  auto touched = [=]() { return double(with_gradient().rows.numel()); };

  // The rows' update by each rule (memory_ext's op), and the least bytes it moves for U rows.
  auto adam_update = [=](Table& t, const at::Tensor& rows, const at::Tensor& rows_grad) {
    t.step += 1;
    ops.row_adam_.call(t.param, t.exp_avg, t.exp_avg_sq, rows, rows_grad, kLr, kBeta1, kBeta2, kEps,
                       kWeightDecay, t.step);
  };
  auto adagrad_update = [=](Table& t, const at::Tensor& rows, const at::Tensor& rows_grad) {
    ops.row_adagrad_.call(t.param, t.sum_sq, rows, rows_grad, kLr, kEps, kWeightDecay);
  };
  auto adam_bytes = [=](double rows) { return rows * dim * (6 * e + e); };
  auto adagrad_bytes = [=](double rows) { return rows * (dim * (2 * e + e) + 8); };

  add_case(run, name("memory_ext", "row_adam"), [=](benchmark::State& st) {
    Table& t = with_gradient();
    run.loop(st, [&] { adam_update(t, t.rows, t.rows_grad); });
    report(st, {adam_bytes(touched()), 0});
  });
  add_case(run, name("torch", "row_adam"), [=](benchmark::State& st) {
    Table& t = with_gradient();
    run.loop(st, [&] { torch_row_adam(t); });
    report(st, {adam_bytes(touched()), 0});
  });
  add_case(run, name("memory_ext", "row_adagrad"), [=](benchmark::State& st) {
    Table& t = with_gradient();
    run.loop(st, [&] { adagrad_update(t, t.rows, t.rows_grad); });
    report(st, {adagrad_bytes(touched()), 0});
  });
  add_case(run, name("torch", "row_adagrad"), [=](benchmark::State& st) {
    Table& t = with_gradient();
    run.loop(st, [&] { torch_row_adagrad(t); });
    report(st, {adagrad_bytes(touched()), 0});
  });
  add_case(run, name("torch", "dense_adamw"), [=](benchmark::State& st) {
    Table& t = with_gradient();
    const at::Tensor dense_grad =
        ops.rows_to_dense.call(t.rows, t.rows_grad, c10::SymInt(n_rows), false);
    at::Tensor step = at::zeros({}, run.options(at::kFloat));
    run.loop(st, [&] {
      step.add_(1);
      at::_fused_adamw_({t.param}, {dense_grad}, {t.exp_avg}, {t.exp_avg_sq}, {}, {step}, kLr,
                        kBeta1, kBeta2, kWeightDecay, kEps, false, false);
    });
    report(st, {adam_bytes(double(n_rows)), 0});
  });

  // A whole step: lookup, sparse backward, then the rule's update of the rows read. Bytes:
  // the rows read twice, then each touched row's gradient written and read with the update's
  // traffic (for Adam this is bench_value_update.py's count, 7 elements per touched element).
  using Update = std::function<void(Table&, const at::Tensor&, const at::Tensor&)>;
  auto add_step = [&](const char* op, Update update, double gradient_and_state_elements,
                      double per_row_bytes) {
    add_case(run, name("memory_ext", op), [=](benchmark::State& st) {
      Table& t = with_gradient();
      run.loop(st, [&] {
        benchmark::DoNotOptimize(ops.embedding_bag.call(t.param, t.indices, t.weights, true));
        auto [r, g, w] =
            ops.embedding_bag_backward.call(t.grad_out, t.param, t.indices, t.weights, true);
        update(t, r, g);
      });
      const double bytes = 2 * lookups * dim * e +
                           touched() * (dim * e * gradient_and_state_elements + per_row_bytes);
      report(st, {bytes, double(tokens)});
    });
  };
  add_step("step_adam", adam_update, 7, 0);
  add_step("step_adagrad", adagrad_update, 4, 8);
}

}  // namespace bench

// The memory_ext operators as the C++ benchmarks call them: typed dispatcher handles, so
// a benchmark goes through the dispatcher exactly as Python's torch.ops.memory.* does (the
// registrations come from the operator objects linked into each executable).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>

namespace bench {

struct MemoryOps {
  using Tensor = at::Tensor;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&)> embedding_bag;
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                              const Tensor&, const Tensor&, bool)>
      embedding_bag_backward;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, c10::SymInt)> rows_to_dense;
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t)>
      pk_topk;
  c10::TypedOperatorHandle<void(Tensor&, Tensor&, Tensor&, const Tensor&, const Tensor&, double,
                                double, double, double, double, int64_t)>
      row_adam_;
  c10::TypedOperatorHandle<void(Tensor&, Tensor&, const Tensor&, const Tensor&, double, double,
                                double)>
      row_adagrad_;
  c10::TypedOperatorHandle<void(bool)> set_index_checks;

  // The handles, after checking that every op has a kernel for `key` (CPU or CUDA); a
  // build without them exits with a message naming what is missing.
  static MemoryOps find(c10::DispatchKey key) {
    auto& d = c10::Dispatcher::singleton();
    auto op = [&](const char* name) {
      const auto h = d.findSchemaOrThrow(name, "");
      if (!h.hasKernelForDispatchKey(key)) {
        std::fprintf(stderr, "%s has no %s kernel in this build\n", name, c10::toString(key));
        std::exit(1);
      }
      return h;
    };
    MemoryOps o{
        op("memory::embedding_bag").typed<Tensor(const Tensor&, const Tensor&, const Tensor&)>(),
        op("memory::embedding_bag_backward")
            .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, bool)>(),
        op("memory::rows_to_dense").typed<Tensor(const Tensor&, const Tensor&, c10::SymInt)>(),
        op("memory::pk_topk")
            .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t)>(),
        op("memory::row_adam_")
            .typed<void(Tensor&, Tensor&, Tensor&, const Tensor&, const Tensor&, double, double,
                        double, double, double, int64_t)>(),
        op("memory::row_adagrad_")
            .typed<void(Tensor&, Tensor&, const Tensor&, const Tensor&, double, double, double)>(),
        d.findSchemaOrThrow("memory::set_index_checks", "").typed<void(bool)>(),
    };
    return o;
  }
};

}  // namespace bench

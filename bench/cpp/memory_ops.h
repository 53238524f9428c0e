// The memory_ext operators as the C++ benchmarks call them: typed dispatcher handles, so
// a benchmark goes through the dispatcher exactly as Python's torch.ops.memory.* does (the
// registrations come from the operator objects linked into each executable).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstdlib>
#include <tuple>

namespace bench {

struct MemoryOps {
  using Tensor = at::Tensor;
  // The C++ signature of each op's kernels (csrc/ops.cpp has the schemas).
  using EmbeddingBag = Tensor(const Tensor&, const Tensor&, const Tensor&, bool);
  using EmbeddingBagBackward = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                                  const Tensor&, const Tensor&,
                                                                  bool);
  using RowsToDense = Tensor(const Tensor&, const Tensor&, c10::SymInt, bool);
  using PkTopk = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t);
  using RowAdam = void(Tensor&, Tensor&, Tensor&, const Tensor&, const Tensor&, double, double,
                       double, double, double, int64_t);
  using RowAdagrad = void(Tensor&, Tensor&, const Tensor&, const Tensor&, double, double, double);
  using SetIndexChecks = void(bool);

  c10::TypedOperatorHandle<EmbeddingBag> embedding_bag;
  c10::TypedOperatorHandle<EmbeddingBagBackward> embedding_bag_backward;
  c10::TypedOperatorHandle<RowsToDense> rows_to_dense;
  c10::TypedOperatorHandle<PkTopk> pk_topk;
  c10::TypedOperatorHandle<RowAdam> row_adam_;
  c10::TypedOperatorHandle<RowAdagrad> row_adagrad_;
  c10::TypedOperatorHandle<SetIndexChecks> set_index_checks;

  // The handles, after checking that every op has a kernel for `key` (CPU or CUDA); a
  // build without them exits with a message naming what is missing.
  static MemoryOps find(c10::DispatchKey key) {
    return {
        kernel<EmbeddingBag>("memory::embedding_bag", key),
        kernel<EmbeddingBagBackward>("memory::embedding_bag_backward", key),
        kernel<RowsToDense>("memory::rows_to_dense", key),
        kernel<PkTopk>("memory::pk_topk", key),
        kernel<RowAdam>("memory::row_adam_", key),
        kernel<RowAdagrad>("memory::row_adagrad_", key),
        // A composite op (no backend kernel): only its schema is needed.
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("memory::set_index_checks", "")
            .typed<SetIndexChecks>(),
    };
  }

 private:
  template <typename Signature>
  static c10::TypedOperatorHandle<Signature> kernel(const char* name, c10::DispatchKey key) {
    const auto h = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
    if (!h.hasKernelForDispatchKey(key)) {
      std::fprintf(stderr, "%s has no %s kernel in this build\n", name, c10::toString(key));
      std::exit(1);
    }
    return h.typed<Signature>();
  }
};

}  // namespace bench

// CUDA ops of the embedding_bag family: argument checks, output allocation, index
// reports, the dense form of a sparse row gradient, and the registration for the CUDA
// dispatch key. The kernels of the forward and backward live next to this file.
//
// Index validation: kernels never read out of bounds; an out-of-range lookup adds nothing
// and gets a zero weight gradient. With index checks on (see memory_ext/index_checks.h)
// the kernels also record the lowest bad position on the device; in the default "sync"
// mode the op then raises the same error as the CPU kernel, at the cost of one host
// synchronisation in the forward (the sparse backward synchronises anyway to size its
// outputs; the dense backward, whose output size is known, only when it checks; the
// padded backward never: it does not report),
// and in "async" mode the position goes to the device's record (async_index_errors.h) for
// memory_ext.ops.check_errors() to raise later.
// A caller that vouches for its indices (check_indices / check_rows false: indices the
// library made, as the autograd formulas and the memory layers pass) skips that
// synchronisation, so a layer's training step waits on the device only where the
// backward sizes its outputs.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "async_index_errors.h"
#include "embedding_bag_cuda.h"
#include "memory_ext/checks.h"
#include "memory_ext/cuda_utils.cuh"
#include "memory_ext/index_checks.h"
#include "memory_ext/prologues.h"
#include "rows_to_dense_kernel.cuh"

namespace memory_ext {
namespace {

using cuda::check_rows_kernel;
using cuda::grid_for;
using cuda::kDenseBlock;
using cuda::kDenseRows;
using cuda::rows_to_dense_kernel;

// Raises the CPU kernels' error for the lookup at flat position `pos` (error path only:
// it reads the bad value back from the device).
[[noreturn]] void fail_index(const char* op, const at::Tensor& indices, int64_t pos, int64_t rows) {
  fail_index_out_of_range(op, pos, indices.size(1), indices.reshape({-1})[pos].item<int64_t>(),
                          rows);
}

// Calls f.template operator()<W>() with W the widest unit (16, 8, 4, 2 or 1 bytes) that
// rows of row_bytes at src's and dst's addresses allow (cuda::dense_copy_unit): the kernels
// that move or zero whole rows of any dtype.
template <typename F>
void with_copy_unit(int64_t row_bytes, const at::Tensor& src, const at::Tensor& dst, F&& f) {
  switch (cuda::dense_copy_unit(row_bytes, src.const_data_ptr(), dst.const_data_ptr())) {
    case 16:
      return f.template operator()<uint4>();
    case 8:
      return f.template operator()<unsigned long long>();
    case 4:
      return f.template operator()<unsigned int>();
    case 2:
      return f.template operator()<unsigned short>();
    default:
      return f.template operator()<unsigned char>();
  }
}

// uint32 data kept in int32 tensors.
const uint32_t* as_u32(const at::Tensor& t) {
  return reinterpret_cast<const uint32_t*>(t.const_data_ptr<int32_t>());
}
uint32_t* as_mutable_u32(at::Tensor& t) {
  return reinterpret_cast<uint32_t*>(t.mutable_data_ptr<int32_t>());
}

at::Tensor embedding_bag_cuda(const at::Tensor& values_, const at::Tensor& indices_,
                              const at::Tensor& weights_, bool check_indices) {
  check_embedding_bag_args("embedding_bag", values_, indices_, weights_);
  const c10::cuda::CUDAGuard guard(values_.device());
  const auto values = values_.contiguous();
  const auto indices = indices_.contiguous();
  const auto weights = weights_.contiguous();
  auto out = at::empty({indices.size(0), values.size(1)}, values.options());
  if (out.numel() == 0) return out;

  const IndexCheckMode mode = check_indices ? index_check_mode() : IndexCheckMode::kOff;
  const bool check = mode != IndexCheckMode::kOff;
  at::Tensor first_bad;
  if (check) first_bad = at::full({1}, -1, values.options().dtype(at::kLong));
  cuda::ForwardArgs a{};
  a.values = values.const_data_ptr();
  a.indices = indices.const_data_ptr();
  a.weights = weights.const_data_ptr();
  a.out = out.mutable_data_ptr();
  a.tokens = indices.size(0);
  a.bag = indices.size(1);
  a.rows = values.size(0);
  a.dim = values.size(1);
  a.idx64 = indices.scalar_type() == at::kLong;
  a.w_f32 = weights.scalar_type() == at::kFloat;
  a.first_bad = check ? reinterpret_cast<unsigned long long*>(first_bad.mutable_data_ptr<int64_t>())
                      : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cuda::launch_embedding_bag(values.scalar_type(), a, stream);
  if (mode == IndexCheckMode::kSync) {
    const int64_t bad = first_bad.item<int64_t>();  // the one synchronisation
    if (bad >= 0) fail_index("embedding_bag", indices, bad, a.rows);
  } else if (mode == IndexCheckMode::kAsync) {
    cuda::record_bad_lookup(cuda::RecordedOp::kEmbeddingBag, first_bad, indices, a.rows, stream);
  }
  return out;
}

// The backward's arguments from its inputs and the grouping; outputs and partial sums
// are sized from the grouping's counts (upper bounds when they stay on the device).
struct BackwardLaunch {
  cuda::BackwardArgs args{};
  at::Tensor partial, long_runs;

  BackwardLaunch(const EmbeddingBagBackwardInputs& in, const cuda::RowGroups& g) {
    const int64_t dim = in.values.size(1);
    if (g.n_long_slots > 0) {
      partial = at::empty({g.n_long_slots, dim},
                          in.values.options().dtype(acc_dtype(in.values.scalar_type())));
      long_runs = at::empty({g.n_long_runs}, in.indices.options().dtype(at::kInt));
    }
    cuda::BackwardArgs& a = args;
    a.grad_out = in.grad_out.const_data_ptr();
    a.values = in.values.const_data_ptr();
    a.weights = in.weights.const_data_ptr();
    a.weights_grad = in.need_weights_grad ? in.weights_grad.mutable_data_ptr() : nullptr;
    a.keys = as_u32(g.keys);
    a.positions = as_u32(g.positions);
    a.run_begin = as_u32(g.run_begin);
    a.plan = reinterpret_cast<const cuda::RunPlan*>(g.plan.const_data_ptr());
    a.partial = partial.defined() ? partial.mutable_data_ptr() : nullptr;
    a.long_runs = long_runs.defined() ? as_mutable_u32(long_runs) : nullptr;
    a.bag = in.indices.size(1);
    a.dim = dim;
    a.n_runs = g.n_runs;
    a.n_segments = g.n_segments;
    a.n_long_runs = g.n_long_runs;
    a.lookups = in.indices.numel();
    a.w_f32 = in.weights.scalar_type() == at::kFloat;
    a.device_counts = g.counts_on_device ? g.info.const_data_ptr<int64_t>() : nullptr;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_bag_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& weights, bool need_weights_grad) {
  check_embedding_bag_backward_args(grad_out, values, indices, weights);
  const c10::cuda::CUDAGuard guard(values.device());
  const EmbeddingBagBackwardInputs in =
      embedding_bag_backward_inputs(grad_out, values, indices, weights, need_weights_grad);
  if (in.no_lookups()) return in.no_lookups_result();
  const int64_t dim = in.values.size(1), n_rows = in.values.size(0);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cuda::RowGroups g = cuda::group_by_row(in.indices, n_rows, stream);
  switch (cuda::bad_lookup_action(g.first_bad, index_checks_enabled())) {
    case cuda::BadLookups::kNone:
      break;
    case cuda::BadLookups::kRaise:
      fail_index("embedding_bag_backward", in.indices, g.first_bad, n_rows);
    case cuda::BadLookups::kSkip:
      if (need_weights_grad) in.weights_grad.zero_();
      break;
  }

  at::Tensor rows = at::empty({g.n_runs}, in.indices.options().dtype(at::kLong));
  at::Tensor rows_grad = at::empty({g.n_runs, dim}, in.values.options());
  BackwardLaunch launch(in, g);
  launch.args.rows_out = rows.mutable_data_ptr<int64_t>();
  launch.args.rows_grad = rows_grad.mutable_data_ptr();
  cuda::launch_embedding_bag_backward(in.values.scalar_type(), launch.args, stream);
  return {rows, rows_grad, in.weights_grad};
}

// The sparse gradient in outputs of a fixed size, without a host synchronisation: the
// grouping's counts stay on the device (the grid and the outputs are sized by
// backward_bounds, whose run bound is the capacity min(lookups, rows)); the kernels write
// the first `count` rows and the padding is what was put there before them. Index -1 (the
// padding of merged calls) and any other out-of-range index form the run of bad lookups,
// which the kernels skip; reporting them would need the host to wait, so the op does not.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> embedding_bag_backward_padded_cuda(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& weights, bool need_weights_grad) {
  check_embedding_bag_backward_args(grad_out, values, indices, weights,
                                    "embedding_bag_backward_padded");
  const c10::cuda::CUDAGuard guard(values.device());
  const EmbeddingBagBackwardInputs in =
      embedding_bag_backward_inputs(grad_out, values, indices, weights, need_weights_grad);
  const int64_t n_rows = in.values.size(0), dim = in.values.size(1);
  const int64_t capacity = std::min<int64_t>(in.indices.numel(), n_rows);
  const auto long_options = in.indices.options().dtype(at::kLong);
  at::Tensor rows = at::full({capacity}, -1, long_options);
  at::Tensor rows_grad = at::empty({capacity, dim}, in.values.options());
  if (need_weights_grad) in.weights_grad.zero_();  // bad lookups are never written
  if (in.no_lookups()) return {rows, rows_grad, in.weights_grad, at::zeros({}, long_options)};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cuda::RowGroups g = cuda::group_by_row(in.indices, n_rows, stream, /*read_counts=*/false);
  // The runs of valid rows: the grouping's runs less the run of bad lookups, if any.
  const at::Tensor count = g.info.narrow(0, cuda::kRunsWithBad, 1)
                               .sub(g.info.narrow(0, cuda::kFirstBad, 1).ge(0).to(at::kLong))
                               .reshape({});
  // The slots past the count are zeroed, the others written by the backward: each once.
  if (rows_grad.numel() > 0)
    with_copy_unit(dim * rows_grad.element_size(), rows_grad, rows_grad, [&]<typename W>() {
      cuda::zero_rows_from_count_kernel<W>
          <<<grid_for(capacity, kDenseRows), kDenseBlock, 0, stream>>>(
              count.const_data_ptr<int64_t>(), static_cast<W*>(rows_grad.mutable_data_ptr()),
              capacity, dim * rows_grad.element_size() / int64_t(sizeof(W)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  BackwardLaunch launch(in, g);
  launch.args.rows_out = rows.mutable_data_ptr<int64_t>();
  launch.args.rows_grad = rows_grad.mutable_data_ptr();
  cuda::launch_embedding_bag_backward(in.values.scalar_type(), launch.args, stream);
  return {rows, rows_grad, in.weights_grad, count};
}

// The dense gradient without a host synchronisation: the grouping's counts stay on the
// device, the kernels write each touched row's gradient into a zeroed (rows, dim) table.
// Index errors: "sync" reads the lowest bad position back (a synchronisation, only with
// check_indices), "async" records it, "off" or check_indices false skip bad lookups.
std::tuple<at::Tensor, at::Tensor> embedding_bag_backward_dense_cuda(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& weights, bool need_weights_grad, bool check_indices) {
  check_embedding_bag_backward_args(grad_out, values, indices, weights,
                                    "embedding_bag_backward_dense");
  const c10::cuda::CUDAGuard guard(values.device());
  const EmbeddingBagBackwardInputs in =
      embedding_bag_backward_inputs(grad_out, values, indices, weights, need_weights_grad);
  const int64_t n_rows = in.values.size(0);
  at::Tensor grad_values = at::zeros(in.values.sizes(), in.values.options());
  // Bad lookups are never written: their weight gradient is the zero put here.
  if (need_weights_grad) in.weights_grad.zero_();
  if (in.no_lookups()) return {grad_values, in.weights_grad};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cuda::RowGroups g = cuda::group_by_row(in.indices, n_rows, stream, /*read_counts=*/false);
  const IndexCheckMode mode = check_indices ? index_check_mode() : IndexCheckMode::kOff;
  const at::Tensor first_bad = g.info.narrow(0, cuda::kFirstBad, 1);
  if (mode == IndexCheckMode::kSync) {
    const int64_t bad = first_bad.item<int64_t>();
    if (bad >= 0) fail_index("embedding_bag_backward_dense", in.indices, bad, n_rows);
  } else if (mode == IndexCheckMode::kAsync) {
    cuda::record_bad_lookup(cuda::RecordedOp::kEmbeddingBagBackwardDense, first_bad, in.indices,
                            n_rows, stream);
  }
  if (grad_values.numel() == 0) return {grad_values, in.weights_grad};  // dim 0: dots are 0
  BackwardLaunch launch(in, g);
  launch.args.rows_out = nullptr;
  launch.args.rows_grad = grad_values.mutable_data_ptr();
  launch.args.dense_rows = true;
  cuda::launch_embedding_bag_backward(in.values.scalar_type(), launch.args, stream);
  return {grad_values, in.weights_grad};
}

at::Tensor rows_to_dense_cuda(const at::Tensor& rows_, const at::Tensor& rows_grad_, int64_t n_rows,
                              bool check_rows) {
  check_rows_to_dense_args(rows_, rows_grad_, n_rows);
  const c10::cuda::CUDAGuard guard(rows_grad_.device());
  const auto rows = rows_.contiguous();
  const auto rows_grad = rows_grad_.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n_unique = rows.size(0);
  const IndexCheckMode mode = check_rows ? index_check_mode() : IndexCheckMode::kOff;
  if (n_unique > 0 && mode != IndexCheckMode::kOff) {
    at::Tensor first_bad = at::full({1}, -1, rows.options());
    check_rows_kernel<<<grid_for(n_unique, kDenseBlock), kDenseBlock, 0, stream>>>(
        rows.const_data_ptr<int64_t>(), n_unique, n_rows,
        reinterpret_cast<unsigned long long*>(first_bad.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (mode == IndexCheckMode::kAsync)
      cuda::record_bad_sparse_row(first_bad, rows, n_rows, stream);
    const int64_t u = mode == IndexCheckMode::kSync ? first_bad.item<int64_t>()  // the one sync
                                                    : -1;
    if (u >= 0) {
      const at::Tensor near = rows.narrow(0, std::max<int64_t>(u - 1, 0), u > 0 ? 2 : 1).cpu();
      const int64_t r = near[u > 0 ? 1 : 0].item<int64_t>();
      fail_sparse_row(kRowsToDenseRows, u, near[0].item<int64_t>(), r, n_rows);
    }
  }
  auto out = at::empty({n_rows, rows_grad.size(1)}, rows_grad.options());
  if (out.numel() == 0) return out;
  // Any dtype works: rows_to_dense moves bytes, in the widest unit that fits.
  const int64_t n_rows_out = out.size(0), row_bytes = out.size(1) * out.element_size();
  with_copy_unit(row_bytes, rows_grad, out, [&]<typename W>() {
    rows_to_dense_kernel<W><<<grid_for(n_rows_out, kDenseRows), kDenseBlock, 0, stream>>>(
        rows.const_data_ptr<int64_t>(), rows.size(0),
        static_cast<const W*>(rows_grad.const_data_ptr()), static_cast<W*>(out.mutable_data_ptr()),
        n_rows_out, row_bytes / int64_t(sizeof(W)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(memory, CUDA, m) {
  m.impl("embedding_bag", &embedding_bag_cuda);
  m.impl("embedding_bag_backward", &embedding_bag_backward_cuda);
  m.impl("embedding_bag_backward_dense", &embedding_bag_backward_dense_cuda);
  m.impl("embedding_bag_backward_padded", &embedding_bag_backward_padded_cuda);
  m.impl("rows_to_dense", &rows_to_dense_cuda);
}

}  // namespace memory_ext

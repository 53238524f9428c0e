// Launcher of the CUDA embedding_bag backward (kernels in
// embedding_bag_backward_kernel.cuh). With device counts, n_segments and n_long_runs are
// upper bounds: the grids cover them and the kernels stop at the exact counts.
#include <c10/cuda/CUDAException.h>

#include "embedding_bag_backward_kernel.cuh"
#include "embedding_bag_cuda.h"
#include "memory_ext/cuda_utils.cuh"
#include "memory_ext/launch_rules.h"

namespace memory_ext::cuda {

void launch_embedding_bag_backward(c10::ScalarType value_type, const BackwardArgs& a,
                                   cudaStream_t stream) {
  if (a.n_segments == 0) return;
  dispatch_value_type(value_type, "embedding_bag_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    // The widest vector that the row length and every vector-accessed base allow (grad_out
    // and values may be views with a storage offset); partial rows hold the accumulator
    // type, so the same vector of columns is twice the bytes there for 16-bit values.
    constexpr int kV = kVec16<T>;
    const int vec = widest_vector(a.dim, kV,
                                  {{a.values, sizeof(T)},
                                   {a.grad_out, sizeof(T)},
                                   {a.rows_grad, sizeof(T)},
                                   {a.partial, sizeof(acc_t<T>)}});
    with_vector<kV>(vec, [&]<int VEC>() {
      // Mostly unique rows: several runs per group (the short-run schedule), with the same
      // results bit for bit as one group per segment. It is chosen from the counts; where
      // they stay on the device both schedules are launched (over the bounds) and each
      // kernel applies the same rule to the exact counts, so one of them exits at once.
      BackwardArgs b = a;
      const bool host_counts = a.device_counts == nullptr;
      b.both_schedules = !host_counts && a.dim / VEC <= kShortRunMaxAccesses;
      if (b.both_schedules ||
          use_short_run_backward(a.n_runs, a.n_segments, a.n_long_runs, a.lookups, a.dim / VEC)) {
        with_short_run_shape<VEC>(a.dim / VEC, [&]<int G, int VPT, int R>() {
          embedding_bag_backward_short_kernel<T, VEC, G, VPT, R>
              <<<grid_for(ceil_div(b.n_runs, kShortUnit), kShortBlock / G), kShortBlock, 0,
                 stream>>>(b);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        if (!b.both_schedules) return;
      }
      with_backward_shape<VEC>(a.dim / VEC, [&]<int G, int VPT, int R, bool TILED>() {
        constexpr int kBlock = backward_block(G);
        embedding_bag_backward_kernel<T, VEC, G, VPT, R, TILED>
            <<<grid_for(b.n_segments, kBlock / G), kBlock, 0, stream>>>(b);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    const int64_t items = a.n_long_runs * ceil_div(a.dim, kReduceBlock);
    if (items > 0) {
      embedding_bag_backward_reduce_kernel<T><<<grid_for(items, 1), kReduceBlock, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace memory_ext::cuda

// Launcher of the CUDA embedding_bag forward (kernel in embedding_bag_forward_kernel.cuh).
#include <c10/cuda/CUDAException.h>

#include "embedding_bag_cuda.h"
#include "embedding_bag_forward_kernel.cuh"
#include "memory_ext/cuda_utils.cuh"

namespace memory_ext::cuda {

void launch_embedding_bag(c10::ScalarType value_type, const ForwardArgs& a, cudaStream_t stream) {
  if (a.tokens == 0 || a.dim == 0) return;
  dispatch_value_type(value_type, "embedding_bag", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto run = [&]<int VEC>() {
      with_forward_shape<VEC>(a.dim / VEC, [&]<int G, int VPL>() {
        const int64_t items = a.tokens * ceil_div(a.dim, int64_t(G) * VPL * VEC);
        embedding_bag_kernel<T, VEC, G, VPL>
            <<<grid_for(items, kForwardBlock / G), kForwardBlock, 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    constexpr int kV = kVec16<T>;
    if (use_vector_path(a.dim, kV, {a.values, a.out}))
      run.template operator()<kV>();
    else
      run.template operator()<1>();
  });
}

}  // namespace memory_ext::cuda

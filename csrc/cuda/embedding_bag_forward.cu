// Launcher of the CUDA embedding_bag forward (kernel in embedding_bag_forward_kernel.cuh).
#include <c10/cuda/CUDAException.h>

#include "embedding_bag_cuda.h"
#include "embedding_bag_forward_kernel.cuh"
#include "memory_ext/cuda_utils.cuh"
#include "memory_ext/launch_rules.h"

namespace memory_ext::cuda {

void launch_embedding_bag(c10::ScalarType value_type, const ForwardArgs& a, cudaStream_t stream) {
  if (a.tokens == 0 || a.dim == 0) return;
  dispatch_value_type(value_type, "embedding_bag", [&](auto tag) {
    using T = typename decltype(tag)::type;
    // The widest vector that the row length and both bases allow: an odd dim or a view
    // with a storage offset steps down to 8- or 4-byte accesses where those fit, and to
    // single elements only where nothing wider does.
    constexpr int kV = kVec16<T>;
    const int vec = widest_vector(a.dim, kV, {{a.values, sizeof(T)}, {a.out, sizeof(T)}});
    with_vector<kV>(vec, [&]<int VEC>() {
      with_forward_shape<VEC>(a.dim / VEC, [&]<int G, int VPL>() {
        const int64_t items = a.tokens * ceil_div(a.dim, int64_t(G) * VPL * VEC);
        embedding_bag_kernel<T, VEC, G, VPL>
            <<<grid_for(items, kForwardBlock / G), kForwardBlock, 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace memory_ext::cuda

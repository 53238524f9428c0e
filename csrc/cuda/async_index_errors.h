// Index errors of CUDA calls made with index checks "async" (memory_ext/index_checks.h):
// after a checked kernel has written the lowest bad position of its call on the device,
// the op records it, with the bad value and what the message needs, in a per-device slot
// that keeps the first error until memory_ext.ops.check_errors() reads and clears it. No
// host synchronisation; one one-thread kernel per checked call. The slot of a device is
// allocated by its first async call, so make one before capturing a CUDA graph.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace memory_ext::cuda {

// The ops whose errors are recorded (their names go into the message).
enum class RecordedOp : int64_t {
  kEmbeddingBag = 1,
  kQuantizedEmbeddingBag = 2,
  kRowsToDense = 3,
  kEmbeddingBagBackwardDense = 4
};

// first_bad: int64 (1,) on the device, -1 or the lowest bad flat position of indices
// (tokens, bag), contiguous, int64 or int32; rows: the table's row count.
void record_bad_lookup(RecordedOp op, const at::Tensor& first_bad, const at::Tensor& indices,
                       int64_t rows, cudaStream_t stream);

// first_bad: -1 or the lowest u of rows (U,) int64 out of [0, n_rows) or not above rows[u - 1].
void record_bad_sparse_row(const at::Tensor& first_bad, const at::Tensor& rows, int64_t n_rows,
                           cudaStream_t stream);

}  // namespace memory_ext::cuda

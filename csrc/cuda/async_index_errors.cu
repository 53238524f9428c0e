// The per-device records of async index errors (see async_index_errors.h) and their reader,
// which memory_ext.ops.check_errors() reaches through memory_ext/index_checks.h.
#include "async_index_errors.h"

#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "memory_ext/checks.h"
#include "memory_ext/index_checks.h"

namespace memory_ext::cuda {
namespace {

// The words of a record: the op (0: none recorded), the bad position (flat lookup or row
// slot u), the bad value, the row before it (rows_to_dense), the row count, the bag size.
enum Word { kOp, kPosition, kValue, kPrevious, kRows, kBag, kWords };

// One thread: keeps the first error of the device (a compare-and-swap on the op word, so
// calls on several streams cannot mix two errors' words).
__global__ void record_lookup_kernel(const long long* first_bad, const void* indices, bool idx64,
                                     long long rows, long long bag, long long op,
                                     long long* record) {
  const long long pos = *first_bad;
  if (pos < 0) return;
  auto* op_word = reinterpret_cast<unsigned long long*>(record + kOp);
  if (atomicCAS(op_word, 0ull, static_cast<unsigned long long>(op)) != 0ull) return;
  record[kPosition] = pos;
  record[kValue] =
      idx64 ? static_cast<const long long*>(indices)[pos] : static_cast<const int*>(indices)[pos];
  record[kRows] = rows;
  record[kBag] = bag;
}

__global__ void record_row_kernel(const long long* first_bad, const long long* rows,
                                  long long n_rows, long long* record) {
  const long long u = *first_bad;
  if (u < 0) return;
  auto* op_word = reinterpret_cast<unsigned long long*>(record + kOp);
  const auto op = static_cast<unsigned long long>(RecordedOp::kRowsToDense);
  if (atomicCAS(op_word, 0ull, op) != 0ull) return;
  record[kPosition] = u;
  record[kValue] = rows[u];
  record[kPrevious] = u > 0 ? rows[u - 1] : 0;
  record[kRows] = n_rows;
}

class Records {
 public:
  // The record of the tensor's device, allocated (zeroed) on first use.
  long long* of(const at::Tensor& on_device) {
    const std::lock_guard<std::mutex> lock(mu_);
    const int device = on_device.get_device();
    auto found = records_.find(device);
    if (found == records_.end())
      found =
          records_.emplace(device, at::zeros({kWords}, on_device.options().dtype(at::kLong))).first;
    return reinterpret_cast<long long*>(found->second.mutable_data_ptr<int64_t>());
  }

  // Every device's record, copied to the host (one synchronisation per device), the first
  // error found cleared on its device and returned; {} if none.
  std::vector<int64_t> take_first() {
    const std::lock_guard<std::mutex> lock(mu_);
    for (auto& [device, record] : records_) {
      const c10::cuda::CUDAGuard guard(record.device());
      const at::Tensor host = record.cpu();
      const int64_t* w = host.const_data_ptr<int64_t>();
      if (w[kOp] == 0) continue;
      record.zero_();
      return std::vector<int64_t>(w, w + kWords);
    }
    return {};
  }

 private:
  std::mutex mu_;
  std::map<int, at::Tensor> records_;
};

Records& records() {
  static Records r;
  return r;
}

void raise_first_recorded() {
  const std::vector<int64_t> w = records().take_first();
  if (w.empty()) return;
  switch (static_cast<RecordedOp>(w[kOp])) {
    case RecordedOp::kEmbeddingBag:
      fail_index_out_of_range("embedding_bag", w[kPosition], w[kBag], w[kValue], w[kRows]);
    case RecordedOp::kQuantizedEmbeddingBag:
      fail_index_out_of_range("quantized_embedding_bag", w[kPosition], w[kBag], w[kValue],
                              w[kRows]);
    case RecordedOp::kEmbeddingBagBackwardDense:
      fail_index_out_of_range("embedding_bag_backward_dense", w[kPosition], w[kBag], w[kValue],
                              w[kRows]);
    case RecordedOp::kRowsToDense:
      fail_sparse_row(kRowsToDenseRows, w[kPosition], w[kPrevious], w[kValue], w[kRows]);
  }
  TORCH_CHECK(false, "memory.check_index_errors: unknown record ", w[kOp]);
}

// Registered at load, so that the CPU library's check_index_errors reaches this reader.
const bool registered = [] {
  set_async_index_error_reader(&raise_first_recorded);
  return true;
}();

}  // namespace

void record_bad_lookup(RecordedOp op, const at::Tensor& first_bad, const at::Tensor& indices,
                       int64_t rows, cudaStream_t stream) {
  long long* record = records().of(first_bad);
  record_lookup_kernel<<<1, 1, 0, stream>>>(
      reinterpret_cast<const long long*>(first_bad.const_data_ptr<int64_t>()),
      indices.const_data_ptr(), indices.scalar_type() == at::kLong, rows, indices.size(1),
      static_cast<long long>(op), record);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void record_bad_sparse_row(const at::Tensor& first_bad, const at::Tensor& rows, int64_t n_rows,
                           cudaStream_t stream) {
  long long* record = records().of(first_bad);
  record_row_kernel<<<1, 1, 0, stream>>>(
      reinterpret_cast<const long long*>(first_bad.const_data_ptr<int64_t>()),
      reinterpret_cast<const long long*>(rows.const_data_ptr<int64_t>()), n_rows, record);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace memory_ext::cuda

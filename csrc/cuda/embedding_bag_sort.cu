// Grouping of lookups by row for the CUDA backward: a stable radix sort of (row, position)
// pairs on only the bits a row needs, run boundaries, and the segment plan of each run.
//
// Pipeline (all on the current stream, one host synchronisation at the end):
//   1. keys[p] = indices[p] (or `rows` when out of range, so bad lookups sort last as one
//      run that the backward skips), positions[p] = p; the lowest bad p is recorded.
//   2. stable LSD radix sort on bits [0, bit_width(rows)): positions stay ascending inside
//      each row's run, which fixes the summation order.
//   3. run heads, an exclusive sum of them, and a scatter give each run's first position.
//   4. per run: its segment count and partial-sum slots; an exclusive scan gives the plan.
//   5. the totals and the count of runs are copied to the host to size the outputs.
// Every count is < 2^32 because the op rejects 2^32 lookups or rows.

// CUB is compiled into this library; a private namespace keeps its kernels apart from the
// copies in libtorch or other extensions loaded into the same process.
#define CUB_WRAPPED_NAMESPACE memory_ext_cub
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "embedding_bag_cuda.h"
#include "embedding_bag_sort_kernels.cuh"
#include "memory_ext/cuda_utils.cuh"

namespace memory_ext::cuda {
namespace {

int bit_width(uint64_t v) {
  int b = 0;
  while (v) {
    ++b;
    v >>= 1;
  }
  return b;
}

void cub_check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "memory.embedding_bag_backward: ", what,
              " failed: ", cudaGetErrorString(err));
}

}  // namespace

RowGroups group_by_row(const at::Tensor& indices, int64_t rows, cudaStream_t stream) {
  const int64_t n = indices.numel();
  TORCH_INTERNAL_ASSERT(n > 0 && n < (int64_t(1) << 32) && rows > 0 && rows < (int64_t(1) << 32));
  const auto u32 = indices.options().dtype(at::kInt);  // uint32 data in int32 storage
  at::Tensor keys_a = at::empty({n}, u32), keys_b = at::empty({n}, u32);
  at::Tensor pos_a = at::empty({n}, u32), pos_b = at::empty({n}, u32);
  at::Tensor run_begin = at::empty({n + 1}, u32);
  const int64_t plan_bytes = (n + 1) * int64_t(sizeof(RunPlan));
  at::Tensor counts = at::empty({plan_bytes}, indices.options().dtype(at::kByte));
  at::Tensor plan = at::empty({plan_bytes}, indices.options().dtype(at::kByte));
  at::Tensor info = at::empty({kInfoSize}, indices.options().dtype(at::kLong));
  auto* k_a = reinterpret_cast<uint32_t*>(keys_a.mutable_data_ptr<int32_t>());
  auto* k_b = reinterpret_cast<uint32_t*>(keys_b.mutable_data_ptr<int32_t>());
  auto* p_a = reinterpret_cast<uint32_t*>(pos_a.mutable_data_ptr<int32_t>());
  auto* p_b = reinterpret_cast<uint32_t*>(pos_b.mutable_data_ptr<int32_t>());
  auto* rb = reinterpret_cast<uint32_t*>(run_begin.mutable_data_ptr<int32_t>());
  auto* cnt = reinterpret_cast<RunPlan*>(counts.mutable_data_ptr());
  auto* pl = reinterpret_cast<RunPlan*>(plan.mutable_data_ptr());
  int64_t* inf = info.mutable_data_ptr<int64_t>();
  const unsigned grid = grid_for(n, kSortBlock);
  const unsigned grid_entries = grid_for(n + 1, kSortBlock);

  init_info_kernel<<<1, 32, 0, stream>>>(inf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (indices.scalar_type() == at::kLong)
    make_keys_kernel<<<grid, kSortBlock, 0, stream>>>(indices.const_data_ptr<int64_t>(), n, rows,
                                                      k_a, p_a, inf);
  else
    make_keys_kernel<<<grid, kSortBlock, 0, stream>>>(indices.const_data_ptr<int32_t>(), n, rows,
                                                      k_a, p_a, inf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Temporary storage for the sort and both scans, sized once, from the caching allocator.
  const int end_bit =
      std::max(1, bit_width(static_cast<uint64_t>(rows)));  // `rows` itself must fit
  memory_ext_cub::cub::DoubleBuffer<uint32_t> kb(k_a, k_b), vb(p_a, p_b);
  // 32-bit item counts (n < 2^32) keep CUB on 32-bit offsets; the plan scan has n + 1
  // entries, which may need 64 bits.
  const auto n32 = static_cast<uint32_t>(n);
  size_t sort_bytes = 0, sum_bytes = 0, scan_bytes = 0;
  cub_check(memory_ext_cub::cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, kb, vb, n32, 0,
                                                            end_bit, stream),
            "radix sort sizing");
  cub_check(
      memory_ext_cub::cub::DeviceScan::ExclusiveSum(nullptr, sum_bytes, k_b, p_b, n32, stream),
      "scan sizing");
  cub_check(memory_ext_cub::cub::DeviceScan::ExclusiveScan(nullptr, scan_bytes, cnt, pl, PlanSum{},
                                                           RunPlan{0, 0, 0}, n + 1, stream),
            "scan sizing");
  const size_t temp_bytes = std::max({sort_bytes, sum_bytes, scan_bytes, size_t(1)});
  at::Tensor temp =
      at::empty({static_cast<int64_t>(temp_bytes)}, indices.options().dtype(at::kByte));
  void* tmp = temp.mutable_data_ptr();

  size_t bytes = sort_bytes;
  cub_check(
      memory_ext_cub::cub::DeviceRadixSort::SortPairs(tmp, bytes, kb, vb, n32, 0, end_bit, stream),
      "radix sort");
  const uint32_t* keys = kb.Current();
  // The alternate buffers are free after the sort: reuse them for the run heads.
  uint32_t* heads = kb.Alternate();
  uint32_t* run_id = vb.Alternate();
  run_heads_kernel<<<grid, kSortBlock, 0, stream>>>(keys, n, heads);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bytes = sum_bytes;
  cub_check(memory_ext_cub::cub::DeviceScan::ExclusiveSum(tmp, bytes, heads, run_id, n32, stream),
            "scan");
  run_begin_kernel<<<grid, kSortBlock, 0, stream>>>(heads, run_id, n, rb, inf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  run_counts_kernel<<<grid_entries, kSortBlock, 0, stream>>>(keys, rb, inf, n + 1, rows, cnt);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bytes = scan_bytes;
  cub_check(memory_ext_cub::cub::DeviceScan::ExclusiveScan(tmp, bytes, cnt, pl, PlanSum{},
                                                           RunPlan{0, 0, 0}, n + 1, stream),
            "scan");
  finish_info_kernel<<<1, 32, 0, stream>>>(pl, n, inf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // The one synchronisation: sizes of the outputs and the index report.
  const at::Tensor host = info.to(at::kCPU);
  const int64_t* h = host.const_data_ptr<int64_t>();

  RowGroups g;
  g.first_bad = h[kFirstBad];
  g.n_runs = h[kRunsWithBad] - (g.first_bad >= 0 ? 1 : 0);
  g.n_segments = h[kSegments];
  g.n_long_slots = h[kLongSlots];
  g.n_long_runs = h[kLongRuns];
  // Keep whichever buffers hold the sorted data.
  g.keys = kb.Current() == k_a ? keys_a : keys_b;
  g.positions = vb.Current() == p_a ? pos_a : pos_b;
  g.run_begin = run_begin;
  g.plan = plan;
  return g;
}

}  // namespace memory_ext::cuda

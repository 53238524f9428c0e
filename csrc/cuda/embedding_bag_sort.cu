// Grouping of lookups by row for the CUDA backward: a stable radix sort of (row, position)
// pairs on only the bits a row needs, run boundaries, and the segment plan of each run.
//
// Pipeline (all on the current stream):
//   1. keys[p] = indices[p] (or `rows` when out of range, so bad lookups sort last as one
//      run that the backward skips), positions[p] = p; the lowest bad p is recorded.
//   2. stable LSD radix sort on bits [0, bit_width(rows)): positions stay ascending inside
//      each row's run, which fixes the summation order.
//   3. run heads, an exclusive sum of them, and a scatter give each run's first position.
//   4. per run: its segment count and partial-sum slots; an exclusive scan gives the plan.
//   5. the totals and the count of runs are copied to the host to size the outputs, or,
//      for static sizes, left on the device for the backward's kernels to read (the
//      outputs then sized by backward_bounds): no synchronisation at all.
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

namespace cub = memory_ext_cub::cub;

uint32_t* u32_data(at::Tensor& t) {
  return reinterpret_cast<uint32_t*>(t.mutable_data_ptr<int32_t>());
}

// The device buffers of one grouping (uint32 data in int32 storage): keys and positions
// twice for the sort's double buffering, the run starts, the per-run counts and their scan
// (RunPlan entries as bytes), and the info slots read back at the end.
struct GroupingBuffers {
  at::Tensor keys_a, keys_b, pos_a, pos_b, run_begin, counts, plan, info;

  GroupingBuffers(const at::Tensor& indices, int64_t n) {
    const auto u32 = indices.options().dtype(at::kInt);
    const auto bytes = indices.options().dtype(at::kByte);
    keys_a = at::empty({n}, u32);
    keys_b = at::empty({n}, u32);
    pos_a = at::empty({n}, u32);
    pos_b = at::empty({n}, u32);
    run_begin = at::empty({n + 1}, u32);
    const int64_t plan_bytes = (n + 1) * int64_t(sizeof(RunPlan));
    counts = at::empty({plan_bytes}, bytes);
    plan = at::empty({plan_bytes}, bytes);
    info = at::empty({kInfoSize}, indices.options().dtype(at::kLong));
  }
  RunPlan* counts_data() { return reinterpret_cast<RunPlan*>(counts.mutable_data_ptr()); }
  RunPlan* plan_data() { return reinterpret_cast<RunPlan*>(plan.mutable_data_ptr()); }
  int64_t* info_data() { return info.mutable_data_ptr<int64_t>(); }
};

// Step 1: keys and positions of every lookup, and the lowest bad position.
void make_keys(const at::Tensor& indices, int64_t n, int64_t rows, GroupingBuffers& b,
               cudaStream_t stream) {
  init_info_kernel<<<1, 32, 0, stream>>>(b.info_data());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const unsigned grid = grid_for(n, kSortBlock);
  if (indices.scalar_type() == at::kLong)
    make_keys_kernel<<<grid, kSortBlock, 0, stream>>>(indices.const_data_ptr<int64_t>(), n, rows,
                                                      u32_data(b.keys_a), u32_data(b.pos_a),
                                                      b.info_data());
  else
    make_keys_kernel<<<grid, kSortBlock, 0, stream>>>(indices.const_data_ptr<int32_t>(), n, rows,
                                                      u32_data(b.keys_a), u32_data(b.pos_a),
                                                      b.info_data());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Temporary storage of CUB's sort and two scans, sized once, from the caching allocator.
// 32-bit item counts (n < 2^32) keep CUB on 32-bit offsets; the plan scan has n + 1
// entries, which may need 64 bits.
struct CubWork {
  int end_bit;  // sort on bits [0, end_bit): `rows` itself (the bad-index key) must fit
  size_t sort_bytes = 0, sum_bytes = 0, scan_bytes = 0;
  at::Tensor temp;

  CubWork(const at::Tensor& indices, int64_t n, int64_t rows, GroupingBuffers& b,
          cub::DoubleBuffer<uint32_t>& keys, cub::DoubleBuffer<uint32_t>& positions,
          cudaStream_t stream)
      : end_bit(std::max(1, bit_width(static_cast<uint64_t>(rows)))) {
    const auto n32 = static_cast<uint32_t>(n);
    cub_check(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, keys, positions, n32, 0, end_bit,
                                              stream),
              "radix sort sizing");
    cub_check(cub::DeviceScan::ExclusiveSum(nullptr, sum_bytes, u32_data(b.keys_b),
                                            u32_data(b.pos_b), n32, stream),
              "scan sizing");
    cub_check(cub::DeviceScan::ExclusiveScan(nullptr, scan_bytes, b.counts_data(), b.plan_data(),
                                             PlanSum{}, RunPlan{0, 0, 0}, n + 1, stream),
              "scan sizing");
    const size_t temp_bytes = std::max({sort_bytes, sum_bytes, scan_bytes, size_t(1)});
    temp = at::empty({static_cast<int64_t>(temp_bytes)}, indices.options().dtype(at::kByte));
  }
  void* data() { return temp.mutable_data_ptr(); }
};

// Step 2: stable sort of (key, position) pairs on the row bits.
void sort_pairs(int64_t n, CubWork& work, cub::DoubleBuffer<uint32_t>& keys,
                cub::DoubleBuffer<uint32_t>& positions, cudaStream_t stream) {
  size_t bytes = work.sort_bytes;
  cub_check(cub::DeviceRadixSort::SortPairs(work.data(), bytes, keys, positions,
                                            static_cast<uint32_t>(n), 0, work.end_bit, stream),
            "radix sort");
}

// Step 3: run heads, their exclusive sum, and the first position of each run. The
// alternate buffers of the sort are free by then and hold the heads and run ids.
void find_runs(int64_t n, CubWork& work, cub::DoubleBuffer<uint32_t>& keys,
               cub::DoubleBuffer<uint32_t>& positions, GroupingBuffers& b, cudaStream_t stream) {
  const unsigned grid = grid_for(n, kSortBlock);
  uint32_t* heads = keys.Alternate();
  uint32_t* run_id = positions.Alternate();
  run_heads_kernel<<<grid, kSortBlock, 0, stream>>>(keys.Current(), n, heads);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  size_t bytes = work.sum_bytes;
  cub_check(cub::DeviceScan::ExclusiveSum(work.data(), bytes, heads, run_id,
                                          static_cast<uint32_t>(n), stream),
            "scan");
  run_begin_kernel<<<grid, kSortBlock, 0, stream>>>(heads, run_id, n, u32_data(b.run_begin),
                                                    b.info_data());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Step 4: per run, its segments and partial-sum slots, scanned into the plan; the totals
// land in the info slots.
void plan_runs(int64_t n, int64_t rows, CubWork& work, const uint32_t* sorted_keys,
               GroupingBuffers& b, cudaStream_t stream) {
  run_counts_kernel<<<grid_for(n + 1, kSortBlock), kSortBlock, 0, stream>>>(
      sorted_keys, u32_data(b.run_begin), b.info_data(), n + 1, rows, b.counts_data());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  size_t bytes = work.scan_bytes;
  cub_check(cub::DeviceScan::ExclusiveScan(work.data(), bytes, b.counts_data(), b.plan_data(),
                                           PlanSum{}, RunPlan{0, 0, 0}, n + 1, stream),
            "scan");
  finish_info_kernel<<<1, 32, 0, stream>>>(b.plan_data(), n, b.info_data());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

RowGroups group_by_row(const at::Tensor& indices, int64_t rows, cudaStream_t stream,
                       bool read_counts) {
  const int64_t n = indices.numel();
  TORCH_INTERNAL_ASSERT(n > 0 && n < (int64_t(1) << 32) && rows > 0 && rows < (int64_t(1) << 32));
  GroupingBuffers b(indices, n);
  make_keys(indices, n, rows, b, stream);
  cub::DoubleBuffer<uint32_t> keys(u32_data(b.keys_a), u32_data(b.keys_b));
  cub::DoubleBuffer<uint32_t> positions(u32_data(b.pos_a), u32_data(b.pos_b));
  CubWork work(indices, n, rows, b, keys, positions, stream);
  sort_pairs(n, work, keys, positions, stream);
  find_runs(n, work, keys, positions, b, stream);
  plan_runs(n, rows, work, keys.Current(), b, stream);

  RowGroups g;
  g.info = b.info;
  if (read_counts) {
    // Step 5, the one synchronisation: sizes of the outputs and the index report.
    const at::Tensor host = b.info.to(at::kCPU);
    const int64_t* h = host.const_data_ptr<int64_t>();
    g.first_bad = h[kFirstBad];
    g.n_runs = h[kRunsWithBad] - (g.first_bad >= 0 ? 1 : 0);
    g.n_segments = h[kSegments];
    g.n_long_slots = h[kLongSlots];
    g.n_long_runs = h[kLongRuns];
  } else {
    const BackwardBounds bound = backward_bounds(n, rows);
    g.counts_on_device = true;
    g.n_runs = bound.runs;
    g.n_segments = bound.segments;
    g.n_long_slots = bound.long_slots;
    g.n_long_runs = bound.long_runs;
  }
  // Keep whichever buffers hold the sorted data.
  g.keys = keys.Current() == u32_data(b.keys_a) ? b.keys_a : b.keys_b;
  g.positions = positions.Current() == u32_data(b.pos_a) ? b.pos_a : b.pos_b;
  g.run_begin = b.run_begin;
  g.plan = b.plan;
  return g;
}

}  // namespace memory_ext::cuda

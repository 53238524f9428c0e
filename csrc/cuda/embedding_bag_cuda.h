// Internal interface between the CUDA files of the embedding_bag family:
//   embedding_bag.cu          ops (checks, allocation, index reports), registration, and
//                             the rows_to_dense launch;
//   embedding_bag_forward.cu  the weighted gather;
//   embedding_bag_sort.cu     grouping of lookups by row (radix sort, runs, segments);
//   embedding_bag_backward.cu the one-pass sparse backward over those segments (or, for
//                             mostly unique rows, over several short runs per group).
// The kernels themselves live in torch-free headers (*_kernel.cuh, *_kernels.cuh) with
// their parameter structs in embedding_bag_params.h, so the CPU emulation in
// tests/embedding_bag_emulate.cpp compiles the same source.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "embedding_bag_params.h"

namespace memory_ext::cuda {

// ---------------------------------------------------------------------------------------
// Forward.

// out[t] = sum_j w[t, j] * values[idx[t, j]]; an out-of-range index adds nothing (and is
// reported through first_bad when that is set).
void launch_embedding_bag(c10::ScalarType value_type, const ForwardArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// Grouping of lookups by row (the sort step of the backward).

struct RowGroups {
  at::Tensor keys;       // (n,) uint32 in int32 storage: sorted rows; `rows` marks a bad index
  at::Tensor positions;  // (n,) uint32: flat lookup positions, ascending within a row
  at::Tensor run_begin;  // (n + 1,) uint32: first sorted position of each run, then n
  at::Tensor plan;       // (n + 1,) RunPlan, as bytes
  at::Tensor info;       // (kInfoSize,) int64 on the device: the counts below, exact
  // The counts, read back by the host; or, when counts_on_device, their backward_bounds
  // (the exact counts then stay in `info` for the kernels, and first_bad is not known).
  int64_t n_runs = 0;  // runs of valid rows (a run of bad indices, if any, follows them)
  int64_t n_segments = 0;
  int64_t n_long_slots = 0;  // partial-sum rows needed
  int64_t n_long_runs = 0;
  int64_t first_bad = -1;  // lowest flat position of an out-of-range index, or -1
  bool counts_on_device = false;
};

// Stable grouping of the flat lookup positions of `indices` by row, on the current
// stream. With read_counts it costs one host synchronisation (the number of runs sizes
// the outputs); without, none (for outputs of a size known in advance).
RowGroups group_by_row(const at::Tensor& indices, int64_t rows, cudaStream_t stream,
                       bool read_counts = true);

// ---------------------------------------------------------------------------------------
// Backward over the groups.

void launch_embedding_bag_backward(c10::ScalarType value_type, const BackwardArgs& args,
                                   cudaStream_t stream);

}  // namespace memory_ext::cuda

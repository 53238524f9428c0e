// Internal interface between the CUDA files of the embedding_bag family:
//   embedding_bag.cu          ops (checks, allocation, index reports) and registration,
//                             plus rows_to_dense;
//   embedding_bag_forward.cu  the weighted gather;
//   embedding_bag_sort.cu     grouping of lookups by row (radix sort, runs, segments);
//   embedding_bag_backward.cu the one-pass sparse backward over those segments.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace memory_ext::cuda {

// ---------------------------------------------------------------------------------------
// Forward.

struct ForwardArgs {
  const void* values;   // (rows, dim) value type
  const void* indices;  // (tokens, bag) int32 or int64
  const void* weights;  // (tokens, bag) float32 or value type
  void* out;            // (tokens, dim) value type
  int64_t tokens, bag, rows, dim;
  bool idx64;           // indices are int64
  bool w_f32;           // weights are float32 (else the value type)
  unsigned long long* first_bad;  // lowest bad flat position (atomicMin), or null
};

// out[t] = sum_j w[t, j] * values[idx[t, j]]; an out-of-range index adds nothing (and is
// reported through first_bad when that is set).
void launch_embedding_bag(c10::ScalarType value_type, const ForwardArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// Grouping of lookups by row (the sort step of the backward).

// A run (all lookups of one row) is cut into segments of at most kSegment sorted
// positions; each segment is one work unit of the backward, so a hot row is summed by many
// units in parallel and its partial sums are folded in segment order afterwards. The cut
// points depend only on the data, so the summation order does too.
constexpr int64_t kSegment = 512;

// Exclusive prefix sums over runs (one entry per run, plus a total at the end).
struct RunPlan {
  uint32_t seg;        // first segment of the run
  uint32_t long_slot;  // first partial-sum slot of the run (runs of more than one segment)
  uint32_t long_rank;  // rank of the run among runs of more than one segment
};

struct RowGroups {
  at::Tensor keys;       // (n,) uint32 in int32 storage: sorted rows; `rows` marks a bad index
  at::Tensor positions;  // (n,) uint32: flat lookup positions, ascending within a row
  at::Tensor run_begin;  // (n + 1,) uint32: first sorted position of each run, then n
  at::Tensor plan;       // (n + 1,) RunPlan, as bytes
  int64_t n_runs = 0;        // runs of valid rows (a run of bad indices, if any, follows them)
  int64_t n_segments = 0;
  int64_t n_long_slots = 0;  // partial-sum rows needed
  int64_t n_long_runs = 0;
  int64_t first_bad = -1;    // lowest flat position of an out-of-range index, or -1
};

// Stable grouping of the flat lookup positions of `indices` by row, on the current
// stream. Costs one host synchronisation (the number of runs sizes the outputs).
RowGroups group_by_row(const at::Tensor& indices, int64_t rows, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// Backward over the groups.

struct BackwardArgs {
  const void* grad_out;  // (tokens, dim) value type
  const void* values;    // (rows, dim) value type
  const void* weights;   // (tokens, bag) float32 or value type
  void* weights_grad;    // (tokens, bag) weights' dtype, or null when not needed
  const uint32_t* keys;
  const uint32_t* positions;
  const uint32_t* run_begin;
  const RunPlan* plan;
  int64_t* rows_out;     // (n_runs,)
  void* rows_grad;       // (n_runs, dim) value type
  void* partial;         // (n_long_slots, dim) accumulator type
  uint32_t* long_runs;   // (n_long_runs,)
  int64_t bag, dim, n_runs, n_segments, n_long_runs;
  bool w_f32;
};

void launch_embedding_bag_backward(c10::ScalarType value_type, const BackwardArgs& args,
                                   cudaStream_t stream);

}  // namespace memory_ext::cuda

// Plain parameter structs of the embedding_bag CUDA kernels, shared by the launchers and
// the kernel headers. No torch types: the kernel headers stay compilable as host C++ for
// the CPU emulation (tests/embedding_bag_emulate.cpp).
#pragma once

#include <cstdint>

namespace memory_ext::cuda {

struct ForwardArgs {
  const void* values;   // (rows, dim) value type
  const void* indices;  // (tokens, bag) int32 or int64
  const void* weights;  // (tokens, bag) float32 or value type
  void* out;            // (tokens, dim) value type
  int64_t tokens, bag, rows, dim;
  bool idx64;                     // indices are int64
  bool w_f32;                     // weights are float32 (else the value type)
  unsigned long long* first_bad;  // lowest bad flat position (atomicMin), or null
};

// A run (all lookups of one row) is cut into segments of at most kSegment sorted
// positions; each segment is one work unit of the backward, so a hot row is summed by many
// units in parallel and its partial sums are folded in segment order afterwards. The cut
// points depend only on the data, so the summation order does too.
constexpr int64_t kSegment = 512;

// Slots of the grouping's counts on the device (int64 each): read back by the host to size
// the outputs, or read by the kernels themselves (BackwardArgs::device_counts).
enum Info { kFirstBad = 0, kRunsWithBad, kSegments, kLongSlots, kLongRuns, kInfoSize };

// Upper bounds of the grouping's counts for n lookups over `rows` rows, for launches that
// do not wait for the counts: at most min(n, rows) runs; a run of len positions has
// ceil(len / S) <= 1 + (len - 1) / S segments, so all runs have at most runs + n / S; a
// run of more than one segment has len > S, so there are at most n / (S + 1) of them, and
// their segments (the partial-sum slots) number at most n / S + n / (S + 1) <= 2 n / S.
struct BackwardBounds {
  int64_t runs, segments, long_slots, long_runs;
};
constexpr BackwardBounds backward_bounds(int64_t n, int64_t rows) {
  const int64_t runs = n < rows ? n : rows;
  return {runs, runs + n / kSegment, 2 * (n / kSegment), n / (kSegment + 1)};
}

// Exclusive prefix sums over runs (one entry per run, plus a total at the end).
struct RunPlan {
  uint32_t seg;        // first segment of the run
  uint32_t long_slot;  // first partial-sum slot of the run (runs of more than one segment)
  uint32_t long_rank;  // rank of the run among runs of more than one segment
};

struct BackwardArgs {
  const void* grad_out;  // (tokens, dim) value type
  const void* values;    // (rows, dim) value type
  const void* weights;   // (tokens, bag) float32 or value type
  void* weights_grad;    // (tokens, bag) weights' dtype, or null when not needed
  const uint32_t* keys;
  const uint32_t* positions;
  const uint32_t* run_begin;
  const RunPlan* plan;
  int64_t* rows_out;    // (n_runs,), or null with dense_rows
  void* rows_grad;      // (n_runs, dim) value type, or (rows, dim) with dense_rows
  void* partial;        // (n_long_slots, dim) accumulator type
  uint32_t* long_runs;  // (n_long_runs,)
  int64_t bag, dim, n_runs, n_segments, n_long_runs;
  int64_t lookups;  // sorted positions, bad lookups included (tokens * bag)
  bool w_f32;
  // The grouping's info slots on the device, or null when the host has read the counts
  // into n_runs, n_segments and n_long_runs. Set, those fields hold backward_bounds (they
  // size the grid and the buffers) and the kernels read the exact counts here: no host
  // synchronisation, a launch that a CUDA graph can capture.
  const int64_t* device_counts;
  // A run's row gradient goes to rows_grad[row] of a dense (rows, dim) gradient rather
  // than to rows_grad[run] (rows the run never touches keep what the caller put there).
  bool dense_rows;
  // With device counts the host cannot pick the schedule (use_short_run_backward), so it
  // launches both where the short-run one fits the row; each kernel evaluates the rule on
  // the exact counts and the one not picked exits at once.
  bool both_schedules;
};

}  // namespace memory_ext::cuda

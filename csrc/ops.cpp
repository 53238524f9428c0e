// Every schema of the `memory` operator library, declared once. Backends register their
// kernels in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels and autograd live in
// memory_ext/ops.py. Keeping the schemas here (a file every build compiles) means a
// CPU-only build still knows every op, so errors name the missing backend, not the op.
#include <torch/library.h>

TORCH_LIBRARY(memory, m) {
  // out[t] = sum_j weights[t, j] * values[indices[t, j]], accumulated in float32
  // (float64 for float64 values).
  // values: (rows, dim); indices: (tokens, bag) int64/int32; weights: (tokens, bag).
  // check_indices=false: the caller vouches that every index is in range (indices the
  // library made itself); the CUDA kernel then skips the index report and its host
  // synchronisation (an out-of-range lookup still reads nothing and adds nothing). The CPU
  // kernel checks either way: there the check costs no synchronisation.
  m.def(
      "embedding_bag(Tensor values, Tensor indices, Tensor weights, bool check_indices=True) -> "
      "Tensor");

  // Backward of embedding_bag in sparse form, one pass over the touched rows:
  //   rows:       (U,) int64, the unique touched rows, ascending;
  //   rows_grad:  (U, dim) values dtype, sum of weights[t, j] * grad_out[t] over (t, j)
  //               with indices[t, j] == rows[u], accumulated in float32 (float64 for
  //               float64). The CPU kernel sums each row's terms in input order; the CUDA
  //               kernel sums a row's terms in input order within segments of consecutive
  //               positions, then folds the segments' partial sums in segment order. Each
  //               is the same bits run after run on one device; CPU and CUDA results are
  //               not promised to agree in their last bits;
  //   weights_grad: (tokens, bag) weights dtype, <grad_out[t], values[indices[t, j]]>,
  //               or (0,) when need_weights_grad is false.
  m.def(
      "embedding_bag_backward(Tensor grad_out, Tensor values, Tensor indices, "
      "Tensor weights, bool need_weights_grad) -> (Tensor rows, Tensor rows_grad, "
      "Tensor weights_grad)");

  // embedding_bag_backward with outputs of a size known before the call (a fixed-size
  // step: CUDA-graph capture, torch.compile without data-dependent shapes). With
  // capacity = min(tokens * bag, rows): rows (capacity,) int64 holds embedding_bag_backward's
  // rows, then -1 (padding); rows_grad (capacity, dim) its rows_grad, then zero rows;
  // weights_grad as there; count a 0-d int64 tensor on the inputs' device, the number of
  // rows before the padding. An index of -1 is padding too: it adds nothing and gets a
  // zero weight gradient, so the padded outputs of several calls, concatenated, can be
  // merged by one more call (bags of one, weight one). Other indices must be in range:
  // the CPU kernel raises for them; the CUDA kernel cannot without waiting, so it skips
  // them like -1 (the forward's index check is the one that reports them).
  m.def(
      "embedding_bag_backward_padded(Tensor grad_out, Tensor values, Tensor indices, "
      "Tensor weights, bool need_weights_grad) -> (Tensor rows, Tensor rows_grad, "
      "Tensor weights_grad, Tensor count)");

  // embedding_bag_backward with the row gradient in dense form: grad_values (rows, dim)
  // holds rows_to_dense(rows, rows_grad, rows) of embedding_bag_backward's result, bit for
  // bit, and weights_grad is the same. On CUDA nothing waits for the device (the output's
  // size is known in advance), so a training step with a dense table gradient can be
  // captured in a CUDA graph. check_indices as for embedding_bag: false skips the index
  // report (an out-of-range lookup adds nothing and gets a zero weight gradient); true in
  // the "sync" mode reads the report back, a synchronisation. The CPU kernel checks either way.
  m.def(
      "embedding_bag_backward_dense(Tensor grad_out, Tensor values, Tensor indices, "
      "Tensor weights, bool need_weights_grad, bool check_indices=True) -> (Tensor grad_values, "
      "Tensor weights_grad)");

  // Dense form of a sparse row gradient: (n_rows, dim), rows_grad[u] at rows[u], zero
  // elsewhere; every row of the result written exactly once. check_rows=false: the caller
  // vouches that rows are strictly ascending and in range (rows that
  // embedding_bag_backward returned); the CUDA kernel then skips their check and its host
  // synchronisation. The CPU kernel checks either way.
  m.def(
      "rows_to_dense(Tensor rows, Tensor rows_grad, SymInt n_rows, bool check_rows=True) -> "
      "Tensor");

  // Weighted bag of row-wise quantized rows, for inference (forward only):
  // out[t] = sum_j weights[t, j] * (scale[r] * code[r] + bias[r]), r = indices[t, j],
  // accumulated in float32 and rounded once to out_dtype (float32, bfloat16, float16).
  // packed: (rows, row_bytes) uint8, each row its dim codes then a float32 scale and, for
  // codes "uint8", a float32 bias (row_bytes = dim + 8: the layout of
  // torch.ops.quantized.embedding_bag_byte_prepack); for codes "float8_e4m3fn" the scale
  // alone (row_bytes = dim + 4, value = code * scale). One row is one contiguous read.
  // indices: (tokens, bag) int64/int32; weights: (tokens, bag) float32. check_indices as
  // for embedding_bag.
  m.def(
      "quantized_embedding_bag(Tensor packed, Tensor indices, Tensor weights, str codes, "
      "ScalarType out_dtype, bool check_indices=True) -> Tensor");

  // Exact product-key top-k. query: (tokens, heads, 2 * half); keys: (heads, 2, n_keys,
  // half). scores: (tokens, heads, k) float32 (float64 for float64 inputs) descending, q1.K1[i] +
  // q2.K2[j]; indices: (tokens, heads, k) int64, i * n_keys + j.
  m.def("pk_topk(Tensor query, Tensor keys, int k) -> (Tensor scores, Tensor indices)");

  // pk_topk computed by sorting the half-scores, with ATen ops on any device: the same
  // contract and gradient as pk_topk (exact top-k, equal sums to the lower index). The
  // CUDA pk_topk takes this path when k needs more shared memory than its fused kernel
  // has.
  m.def(
      "pk_topk_by_sorting(Tensor query, Tensor keys, int k) -> (Tensor scores, Tensor "
      "indices)");

  // Lazy Adam(W) on the rows of a sparse gradient, in place (torch.optim.AdamW's update,
  // applied only to rows[u]): param (n_rows, dim); exp_avg, exp_avg_sq (n_rows, dim)
  // float32 (float64 for float64 params); rows (U,) int64 strictly ascending,
  // optionally followed by -1 padding (skipped: embedding_bag_backward_padded's rows);
  // rows_grad (U, dim) in param's dtype; step >= 1 is the optimizer step count for bias correction.
  m.def(
      "row_adam_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor rows, "
      "Tensor rows_grad, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "int step) -> ()");

  // row_adam_ with the step count in a 0-d int64 tensor on param's device, which the call
  // advances by one before the update (whose bias correction uses the new count): nothing
  // is read on the host, so on CUDA the call can be captured in a CUDA graph and replayed
  // (torch.optim.Adam's capturable=True). step must be >= 0 before the call.
  m.def(
      "row_adam_capturable_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!) step, Tensor rows, Tensor rows_grad, float lr, float beta1, float beta2, "
      "float eps, float weight_decay) -> ()");

  // Row-wise Adagrad on the rows of a sparse gradient, in place; its state is one value
  // per row: param (n_rows, dim); sum_sq (n_rows,) float32 (float64 for float64 params);
  // rows (U,) int64 strictly ascending, optionally followed by -1 padding (skipped);
  // rows_grad (U, dim) in param's dtype. For each u:
  // sum_sq[r] += mean_j g_j^2, then p = p * (1 - lr * weight_decay) - lr * g /
  // (sqrt(sum_sq[r]) + eps), with r = rows[u], g = rows_grad[u].
  m.def(
      "row_adagrad_(Tensor(a!) param, Tensor(b!) sum_sq, Tensor rows, Tensor rows_grad, "
      "float lr, float eps, float weight_decay) -> ()");

  // Index validation on devices where it costs a host synchronisation (CUDA); on by
  // default. Off, out-of-range lookups are skipped instead (memory_ext/index_checks.h).
  m.def("set_index_checks(bool enabled) -> ()");
  m.def("index_checks_enabled() -> bool");
  // The same switch with its third mode: "sync" (the default: raise at the call), "async"
  // (record on the device, raise at check_index_errors), "off".
  m.def("set_index_check_mode(str mode) -> ()");
  m.def("index_check_mode() -> str");
  m.def("check_index_errors() -> ()");
}

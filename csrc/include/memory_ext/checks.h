// Argument checks shared by the CPU and CUDA kernels, so both backends reject the same
// inputs with the same messages. Index range is checked by the kernels themselves (it
// needs the data); the messages they raise for bad data are here too, once.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>

namespace memory_ext {

inline bool is_value_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// The accumulation rule of every kernel for ATen dtypes (acc_t in memory_ext/host_device.h
// for kernel types): float64 for float64, float32 for every other floating dtype.
inline c10::ScalarType acc_dtype(c10::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_device(const char* op, const at::Tensor& a, const char* a_name,
                              const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "memory.", op, ": ", a_name, " and ", b_name,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

// values (rows, dim) float; indices (tokens, bag) int32/int64; weights (tokens, bag)
// float32 or the values' dtype.
inline void check_embedding_bag_args(const char* op, const at::Tensor& values,
                                     const at::Tensor& indices, const at::Tensor& weights) {
  TORCH_CHECK(values.dim() == 2, "memory.", op, ": values must be 2-D (rows, dim), got ",
              values.dim(), "-D shape ", values.sizes());
  TORCH_CHECK(indices.dim() == 2, "memory.", op, ": indices must be 2-D (tokens, bag), got shape ",
              indices.sizes());
  TORCH_CHECK(weights.sizes() == indices.sizes(), "memory.", op,
              ": weights must have the shape of indices ", indices.sizes(), ", got ",
              weights.sizes());
  TORCH_CHECK(is_value_dtype(values.scalar_type()), "memory.", op,
              ": values must be float32, bfloat16, float16 or float64, got ", values.scalar_type());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, "memory.",
              op, ": indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK(weights.scalar_type() == at::kFloat || weights.scalar_type() == values.scalar_type(),
              "memory.", op, ": weights must be float32 or the values' dtype (",
              values.scalar_type(), "), got ", weights.scalar_type());
  check_same_device(op, values, "values", indices, "indices");
  check_same_device(op, values, "values", weights, "weights");
  TORCH_CHECK(indices.size(1) == 0 || indices.size(0) == 0 || values.size(0) > 0, "memory.", op,
              ": values has no rows but indices is not empty");
}

// The bytes after a quantized row's codes: a float32 scale, and a float32 bias for uint8
// codes. Returns that tail's length for a codes name, 0 for an unknown name.
inline int64_t quantized_row_tail_bytes(c10::string_view codes) {
  if (codes == "uint8") return 8;
  if (codes == "float8_e4m3fn") return 4;
  return 0;
}

// quantized_embedding_bag: packed (rows, dim + tail) uint8 rows (see ops.cpp); indices
// (tokens, bag) int32/int64; weights (tokens, bag) float32; out_dtype float32, bfloat16 or
// float16; one device.
inline void check_quantized_embedding_bag_args(const at::Tensor& packed, const at::Tensor& indices,
                                               const at::Tensor& weights, c10::string_view codes,
                                               c10::ScalarType out_dtype) {
  const char* op = "quantized_embedding_bag";
  const int64_t tail = quantized_row_tail_bytes(codes);
  TORCH_CHECK(tail > 0, "memory.", op, ": codes must be \"uint8\" or \"float8_e4m3fn\", got \"",
              codes, "\"");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte, "memory.", op,
              ": packed must be a 2-D uint8 tensor of rows (codes, then the float32 scale",
              tail == 8 ? " and bias" : "", "), got ", packed.scalar_type(), " of shape ",
              packed.sizes());
  TORCH_CHECK(packed.size(1) >= tail, "memory.", op, ": packed rows of ", codes, " codes end with ",
              tail, " bytes of scale", tail == 8 ? " and bias" : "", ", so they need at least ",
              tail, " bytes, got ", packed.size(1));
  TORCH_CHECK(indices.dim() == 2, "memory.", op, ": indices must be 2-D (tokens, bag), got shape ",
              indices.sizes());
  TORCH_CHECK(weights.sizes() == indices.sizes(), "memory.", op,
              ": weights must have the shape of indices ", indices.sizes(), ", got ",
              weights.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, "memory.",
              op, ": indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK(weights.scalar_type() == at::kFloat, "memory.", op, ": weights must be float32, got ",
              weights.scalar_type());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "memory.", op, ": out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
  check_same_device(op, packed, "packed", indices, "indices");
  check_same_device(op, packed, "packed", weights, "weights");
  TORCH_CHECK(indices.size(1) == 0 || indices.size(0) == 0 || packed.size(0) > 0, "memory.", op,
              ": packed has no rows but indices is not empty");
}

inline void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& values,
                           const at::Tensor& indices) {
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == indices.size(0) &&
                  grad_out.size(1) == values.size(1),
              "memory.", op, ": grad_out must have shape (tokens, dim) = (", indices.size(0), ", ",
              values.size(1), "), got ", grad_out.sizes());
  TORCH_CHECK(is_value_dtype(grad_out.scalar_type()), "memory.", op,
              ": grad_out must be a floating dtype, got ", grad_out.scalar_type());
  check_same_device(op, values, "values", grad_out, "grad_out");
}

// embedding_bag_backward: the forward's arguments, grad_out, and flat positions and rows
// that fit the 32 bits the backward sorts on.
inline void check_embedding_bag_backward_args(const at::Tensor& grad_out, const at::Tensor& values,
                                              const at::Tensor& indices, const at::Tensor& weights,
                                              const char* op = "embedding_bag_backward") {
  check_embedding_bag_args(op, values, indices, weights);
  check_grad_out(op, grad_out, values, indices);
  TORCH_CHECK(indices.numel() < (int64_t(1) << 32) && values.size(0) < (int64_t(1) << 32),
              "memory.", op, ": more than 2^32 lookups or rows are not supported, got ",
              indices.numel(), " lookups and ", values.size(0), " rows");
}

// The error for an out-of-range lookup at flat position `pos` of (tokens, bag) indices.
[[noreturn]] inline void fail_index_out_of_range(const char* op, int64_t pos, int64_t bag,
                                                 int64_t value, int64_t rows) {
  TORCH_CHECK(false, "memory.", op, ": index out of range: indices[", pos / bag, ", ", pos % bag,
              "] = ", value, " but values has ", rows, " rows");
}

// Ops that take the rows of a sparse gradient (in range, strictly ascending) word their
// errors differently; each rule holds one op's words.
struct SparseRowsRule {
  const char* op;
  const char* range_before;  // between the row and n_rows
  const char* range_after;   // after n_rows
  const char* why_ascending;
};
constexpr SparseRowsRule kRowsToDenseRows{"rows_to_dense", " is out of range for n_rows = ", "",
                                          ""};
constexpr SparseRowsRule kRowAdamRows{"row_adam_", " is out of range for a table of ", " rows",
                                      " (a coalesced gradient)"};
constexpr SparseRowsRule kRowAdamCapturableRows{
    "row_adam_capturable_", " is out of range for a table of ", " rows", " (a coalesced gradient)"};
constexpr SparseRowsRule kRowAdagradRows{"row_adagrad_", " is out of range for a table of ",
                                         " rows", " (a coalesced gradient)"};

// The error for rows[u] = row (after rows[u - 1] = previous): out of range is reported
// first, as the checks run in that order.
[[noreturn]] inline void fail_sparse_row(const SparseRowsRule& rule, int64_t u, int64_t previous,
                                         int64_t row, int64_t n_rows) {
  TORCH_CHECK(row >= 0 && row < n_rows, "memory.", rule.op, ": rows[", u, "] = ", row,
              rule.range_before, n_rows, rule.range_after);
  TORCH_CHECK(false, "memory.", rule.op, ": rows must be strictly ascending", rule.why_ascending,
              ", but rows[", u - 1, "] = ", previous, " and rows[", u, "] = ", row);
}

// rows[0..n) (host memory) in [0, n_rows) and strictly ascending.
inline void check_sparse_rows(const SparseRowsRule& rule, const int64_t* rows, int64_t n,
                              int64_t n_rows) {
  for (int64_t u = 0; u < n; ++u) {
    const int64_t previous = u > 0 ? rows[u - 1] : 0;
    if (rows[u] < 0 || rows[u] >= n_rows || (u > 0 && rows[u] <= previous))
      fail_sparse_row(rule, u, previous, rows[u], n_rows);
  }
}

// The rows of a padded sparse gradient (embedding_bag_backward_padded): rows[0..n) checked
// as by check_sparse_rows up to the first -1, which must be followed by -1 only. Returns
// the number of rows before the padding.
inline int64_t check_padded_sparse_rows(const SparseRowsRule& rule, const int64_t* rows, int64_t n,
                                        int64_t n_rows) {
  int64_t real = 0;
  while (real < n && rows[real] != -1) ++real;
  check_sparse_rows(rule, rows, real, n_rows);
  for (int64_t u = real + 1; u < n; ++u)
    TORCH_CHECK(rows[u] == -1, "memory.", rule.op, ": rows[", u, "] = ", rows[u],
                " follows the padding (-1) that starts at rows[", real,
                "]; only -1 may follow padding");
  return real;
}

inline void check_rows_to_dense_args(const at::Tensor& rows, const at::Tensor& rows_grad,
                                     int64_t n_rows) {
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong,
              "memory.rows_to_dense: rows must be a 1-D int64 tensor, got ", rows.dim(), "-D ",
              rows.scalar_type());
  TORCH_CHECK(rows_grad.dim() == 2 && rows_grad.size(0) == rows.size(0),
              "memory.rows_to_dense: rows_grad must have shape (", rows.size(0), ", dim), got ",
              rows_grad.sizes());
  TORCH_CHECK(n_rows >= 0, "memory.rows_to_dense: n_rows must be >= 0, got ", n_rows);
  check_same_device("rows_to_dense", rows, "rows", rows_grad, "rows_grad");
}

// param (n_rows, dim) contiguous; moments like param in float32 (float64 for float64);
// rows (U,) int64; rows_grad (U, dim) in param's dtype; all on one device. op names the
// caller in errors (row_adam_ or row_adam_capturable_).
inline void check_row_adam_args(const at::Tensor& param, const at::Tensor& exp_avg,
                                const at::Tensor& exp_avg_sq, const at::Tensor& rows,
                                const at::Tensor& rows_grad, double beta1, double beta2,
                                int64_t step, const char* op = "row_adam_") {
  TORCH_CHECK(param.dim() == 2 && param.is_contiguous(), "memory.", op,
              ": param must be a contiguous 2-D tensor, got shape ", param.sizes());
  TORCH_CHECK(at::isFloatingType(param.scalar_type()), "memory.", op,
              ": param must be floating point, got ", param.scalar_type());
  const auto state_type = acc_dtype(param.scalar_type());
  for (const at::Tensor* t : {&exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(t->sizes() == param.sizes() && t->is_contiguous() && t->scalar_type() == state_type,
                "memory.", op, ": exp_avg and exp_avg_sq must be contiguous ", state_type,
                " tensors of param's shape ", param.sizes(), ", got ", t->scalar_type(), " ",
                t->sizes());
    check_same_device(op, param, "param", *t, "optimizer state");
  }
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, "memory.", op,
              ": rows must be a 1-D int64 tensor, got ", rows.dim(), "-D ", rows.scalar_type());
  TORCH_CHECK(rows_grad.dim() == 2 && rows_grad.size(0) == rows.size(0) &&
                  rows_grad.size(1) == param.size(1),
              "memory.", op, ": rows_grad must have shape (", rows.size(0), ", ", param.size(1),
              "), got ", rows_grad.sizes());
  TORCH_CHECK(rows_grad.scalar_type() == param.scalar_type(), "memory.", op,
              ": rows_grad must have param's dtype ", param.scalar_type(), ", got ",
              rows_grad.scalar_type());
  check_same_device(op, param, "param", rows, "rows");
  check_same_device(op, param, "param", rows_grad, "rows_grad");
  TORCH_CHECK(0.0 <= beta1 && beta1 < 1.0 && 0.0 <= beta2 && beta2 < 1.0, "memory.", op,
              ": betas must be in [0, 1), got ", beta1, " and ", beta2);
  TORCH_CHECK(step >= 1, "memory.", op, ": step must be >= 1, got ", step);
}

// row_adam_capturable_'s arguments: row_adam_'s, and the step count, a 0-d int64 tensor
// on param's device (its value is checked by the CPU kernel, which reads it; see
// row_adam.cu for CUDA).
inline void check_row_adam_capturable_args(const at::Tensor& param, const at::Tensor& exp_avg,
                                           const at::Tensor& exp_avg_sq, const at::Tensor& step,
                                           const at::Tensor& rows, const at::Tensor& rows_grad,
                                           double beta1, double beta2) {
  check_row_adam_args(param, exp_avg, exp_avg_sq, rows, rows_grad, beta1, beta2, 1,
                      "row_adam_capturable_");
  TORCH_CHECK(step.dim() == 0 && step.scalar_type() == at::kLong,
              "memory.row_adam_capturable_: step must be a 0-d int64 tensor (the step count), "
              "got a ",
              step.dim(), "-D ", step.scalar_type(), " tensor");
  check_same_device("row_adam_capturable_", param, "param", step, "step");
}

// param (n_rows, dim) contiguous float; sum_sq (n_rows,) contiguous in float32 (float64 for
// float64); rows (U,) int64; rows_grad (U, dim) in param's dtype; all on one device;
// lr >= 0, eps > 0, weight_decay >= 0, all finite (a NaN fails every check).
inline void check_row_adagrad_args(const at::Tensor& param, const at::Tensor& sum_sq,
                                   const at::Tensor& rows, const at::Tensor& rows_grad, double lr,
                                   double eps, double weight_decay) {
  TORCH_CHECK(param.dim() == 2 && param.is_contiguous(),
              "memory.row_adagrad_: param must be a contiguous 2-D tensor, got shape ",
              param.sizes());
  TORCH_CHECK(is_value_dtype(param.scalar_type()),
              "memory.row_adagrad_: param must be float32, bfloat16, float16 or float64, got ",
              param.scalar_type());
  const auto state_type = acc_dtype(param.scalar_type());
  TORCH_CHECK(sum_sq.dim() == 1 && sum_sq.size(0) == param.size(0),
              "memory.row_adagrad_: sum_sq must have shape [", param.size(0),
              "] (one value per row of param), got ", sum_sq.sizes());
  TORCH_CHECK(sum_sq.scalar_type() == state_type, "memory.row_adagrad_: sum_sq must be ",
              state_type, " (the accumulation dtype of ", param.scalar_type(), " params), got ",
              sum_sq.scalar_type());
  TORCH_CHECK(sum_sq.is_contiguous(),
              "memory.row_adagrad_: sum_sq must be contiguous, got strides ", sum_sq.strides());
  check_same_device("row_adagrad_", param, "param", sum_sq, "sum_sq");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong,
              "memory.row_adagrad_: rows must be a 1-D int64 tensor, got ", rows.dim(), "-D ",
              rows.scalar_type());
  TORCH_CHECK(rows_grad.dim() == 2 && rows_grad.size(0) == rows.size(0) &&
                  rows_grad.size(1) == param.size(1),
              "memory.row_adagrad_: rows_grad must have shape (", rows.size(0), ", ", param.size(1),
              "), got ", rows_grad.sizes());
  TORCH_CHECK(rows_grad.scalar_type() == param.scalar_type(),
              "memory.row_adagrad_: rows_grad must have param's dtype ", param.scalar_type(),
              ", got ", rows_grad.scalar_type());
  check_same_device("row_adagrad_", param, "param", rows, "rows");
  check_same_device("row_adagrad_", param, "param", rows_grad, "rows_grad");
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0,
              "memory.row_adagrad_: lr must be finite and >= 0, got ", lr);
  TORCH_CHECK(std::isfinite(eps) && eps > 0.0,
              "memory.row_adagrad_: eps must be finite and > 0, got ", eps);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0,
              "memory.row_adagrad_: weight_decay must be finite and >= 0, got ", weight_decay);
}

// query (tokens, heads, 2 * half); keys (heads, 2, n_keys, half); 1 <= k <= n_keys.
inline void check_pk_topk_args(const at::Tensor& query, const at::Tensor& keys, int64_t k,
                               const char* op = "pk_topk") {
  TORCH_CHECK(query.dim() == 3, "memory.", op,
              ": query must be 3-D (tokens, heads, 2 * half), got shape ", query.sizes());
  TORCH_CHECK(keys.dim() == 4 && keys.size(1) == 2, "memory.", op,
              ": keys must be 4-D "
              "(heads, 2, n_keys, half), got shape ",
              keys.sizes());
  TORCH_CHECK(query.size(2) % 2 == 0, "memory.", op,
              ": query width must be even "
              "(two halves), got ",
              query.size(2));
  TORCH_CHECK(query.size(1) == keys.size(0), "memory.", op, ": query has ", query.size(1),
              " heads but keys has ", keys.size(0));
  TORCH_CHECK(query.size(2) / 2 == keys.size(3), "memory.", op, ": query half width ",
              query.size(2) / 2, " does not match the sub-key width ", keys.size(3));
  TORCH_CHECK(query.scalar_type() == keys.scalar_type(), "memory.", op,
              ": query and keys "
              "must have the same dtype, got ",
              query.scalar_type(), " and ", keys.scalar_type());
  TORCH_CHECK(is_value_dtype(query.scalar_type()), "memory.", op,
              ": query must be float32, "
              "bfloat16, float16 or float64, got ",
              query.scalar_type());
  check_same_device(op, query, "query", keys, "keys");
  TORCH_CHECK(k >= 1 && k <= keys.size(2), "memory.", op,
              ": k must be in [1, n_keys = ", keys.size(2), "], got ", k);
}

}  // namespace memory_ext

"""Argument checks of every op, once, in Python, with the messages of the C++ kernels.

csrc/include/memory_ext/checks.h and the op prologues in csrc/cpu and csrc/cuda reject bad
arguments of the real kernels; the functions here reject the same arguments with the same
messages where no real kernel runs: in the fake kernels (torch.compile, FakeTensorMode,
meta tensors) and in the sharded lookup's local validation. They read metadata only
(shapes, dtypes, devices, contiguity); checks that need the data (index range, rows
ascending) stay in the kernels.

Sizes may be symbolic under a dynamic torch.compile, so a condition that involves a size
goes through ``torch._check``, which neither guards on an unbacked size nor fails spuriously
on one; a condition that is a plain bool raises ``InputError`` directly.
"""
from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "InputError",
    "accumulation_dtype",
    "dtype_name",
    "check_embedding_bag",
    "check_embedding_bag_backward",
    "check_rows_to_dense",
    "check_row_adam",
    "check_row_adam_capturable",
    "check_row_adagrad",
    "check_pk_topk",
    "check_quantized_embedding_bag",
    "QUANTIZED_ROW_TAIL_BYTES",
]

VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# c10::ScalarType names (how the C++ kernels print a dtype) where they differ from the
# capitalised Python name.
_CPP_DTYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex32: "ComplexHalf",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
    torch.qint8: "QInt8",
    torch.quint8: "QUInt8",
    torch.qint32: "QInt32",
    torch.quint4x2: "QUInt4x2",
    torch.quint2x4: "QUInt2x4",
}


class InputError(RuntimeError):
    """A rejected argument: ``memory.<op>: <what>`` (a RuntimeError, as the kernels raise).

    ``op`` and ``what`` are kept apart so that a caller can report the problem under its
    own name (the sharded lookup does).
    """

    def __init__(self, op: str, what: str) -> None:
        super().__init__(f"memory.{op}: {what}")
        self.op = op
        self.what = what


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in for ``dtype`` inputs: float64 for float64, else float32.

    Also the dtype of pk_topk's scores, of row_adam_'s moments, of row_adagrad_'s sum_sq and of weights summed
    across ranks by the sharded lookup.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``dtype`` as the C++ kernels print it (its c10::ScalarType name): Float, BFloat16, Long."""
    name = _CPP_DTYPE_NAMES.get(dtype)
    if name is not None:
        return name
    # float8_e4m3fn -> Float8_e4m3fn, uint16 -> UInt16, bcomplex32 -> BComplex32, int4 -> Int4
    short = str(dtype).removeprefix("torch.")
    for prefix, cpp in (("uint", "UInt"), ("bcomplex", "BComplex")):
        if short.startswith(prefix):
            return cpp + short[len(prefix):]
    return short[:1].upper() + short[1:]


def _int(v) -> str:
    # A failing check prints the size it saw: the trace-time value of a backed symbol.
    if isinstance(v, torch.SymInt):
        hint = v.node.hint
        return str(hint) if hint is not None else str(v)
    return str(v)


def _shape(shape: Sequence) -> str:
    """A shape as c10 prints IntArrayRef: [3, 2]."""
    return "[" + ", ".join(_int(s) for s in shape) + "]"


def _float(x: float) -> str:
    """A double as C++ streams print it (6 significant digits): 0.9, 1, 1e-08."""
    return f"{x:g}"


# and / or / == that keep symbolic sizes symbolic (a Python `and` would guard on them);
# on plain ints and bools they give plain bools.
def _sym_and(*conds):
    return functools.reduce(operator.and_, conds)


def _sym_or(*conds):
    return functools.reduce(operator.or_, conds)


def _sym_eq(a, b):
    if isinstance(a, tuple):
        return len(a) == len(b) and _sym_and(True, *(x == y for x, y in zip(a, b, strict=True)))
    return a == b


def _require(cond, op: str, what: Callable[[], str]) -> None:
    if isinstance(cond, bool):
        if not cond:
            raise InputError(op, what())
    else:
        torch._check(cond, lambda: f"memory.{op}: {what()}")


def _same_device(op: str, a: Tensor, a_name: str, b: Tensor, b_name: str) -> None:
    _require(
        a.device == b.device,
        op,
        lambda: f"{a_name} and {b_name} must be on the same device, got {a.device} and {b.device}",
    )


def _check_bag_shape(op: str, indices: Tensor, weights: Tensor) -> None:
    """Every weighted bag's lookups: indices (tokens, bag), weights of the same shape."""
    _require(indices.dim() == 2, op, lambda: f"indices must be 2-D (tokens, bag), got shape {_shape(indices.shape)}")
    _require(
        _sym_eq(tuple(weights.shape), tuple(indices.shape)), op,
        lambda: f"weights must have the shape of indices {_shape(indices.shape)}, got {_shape(weights.shape)}",
    )


def _check_lookups(op: str, table: Tensor, name: str, indices: Tensor, weights: Tensor) -> None:
    """What every weighted bag asks of its lookups: the table's device, and rows to read
    when there are lookups."""
    _same_device(op, table, name, indices, "indices")
    _same_device(op, table, name, weights, "weights")
    _require(
        _sym_or(indices.shape[1] == 0, indices.shape[0] == 0, table.shape[0] > 0), op,
        lambda: f"{name} has no rows but indices is not empty",
    )


def check_embedding_bag(
    op: str, values: Tensor, indices: Tensor, weights: Tensor, *, weights_dtype: torch.dtype | None = None
) -> None:
    """check_embedding_bag_args of checks.h: values (rows, dim) float; indices (tokens, bag)
    int32/int64; weights (tokens, bag) float32 or the values' dtype; one device.

    ``weights_dtype``: the dtype the kernel will see, for callers that convert the weights
    first (default: weights.dtype).
    """
    w_dtype = weights.dtype if weights_dtype is None else weights_dtype
    _require(
        values.dim() == 2, op,
        lambda: f"values must be 2-D (rows, dim), got {values.dim()}-D shape {_shape(values.shape)}",
    )
    _check_bag_shape(op, indices, weights)
    _require(
        values.dtype in VALUE_DTYPES, op,
        lambda: f"values must be float32, bfloat16, float16 or float64, got {dtype_name(values.dtype)}",
    )
    _require(
        indices.dtype in (torch.int64, torch.int32), op,
        lambda: f"indices must be int64 or int32, got {dtype_name(indices.dtype)}",
    )
    _require(
        w_dtype in (torch.float32, values.dtype), op,
        lambda: f"weights must be float32 or the values' dtype ({dtype_name(values.dtype)}), got {dtype_name(w_dtype)}",
    )
    _check_lookups(op, values, "values", indices, weights)


def check_embedding_bag_backward(
    grad_out: Tensor, values: Tensor, indices: Tensor, weights: Tensor, op: str = "embedding_bag_backward"
) -> None:
    """The prologue of embedding_bag_backward (and of its dense form, named by op): the
    forward's checks, grad_out (tokens, dim) floating on the values' device, and at most
    2^32 lookups and rows."""
    check_embedding_bag(op, values, indices, weights)
    _require(
        grad_out.dim() == 2 and _sym_and(grad_out.shape[0] == indices.shape[0], grad_out.shape[1] == values.shape[1]),
        op,
        lambda: f"grad_out must have shape (tokens, dim) = ({_int(indices.shape[0])}, {_int(values.shape[1])}), "
        f"got {_shape(grad_out.shape)}",
    )
    _require(
        grad_out.dtype in VALUE_DTYPES, op, lambda: f"grad_out must be a floating dtype, got {dtype_name(grad_out.dtype)}"
    )
    _same_device(op, values, "values", grad_out, "grad_out")
    _require(
        _sym_and(indices.numel() < 2**32, values.shape[0] < 2**32), op,
        lambda: f"more than 2^32 lookups or rows are not supported, got {_int(indices.numel())} lookups and "
        f"{_int(values.shape[0])} rows",
    )


def check_rows_to_dense(rows: Tensor, rows_grad: Tensor, n_rows) -> None:
    """check_rows_to_dense_args of checks.h: rows (U,) int64; rows_grad (U, dim); n_rows >= 0."""
    op = "rows_to_dense"
    _require(
        rows.dim() == 1 and rows.dtype == torch.int64, op,
        lambda: f"rows must be a 1-D int64 tensor, got {rows.dim()}-D {dtype_name(rows.dtype)}",
    )
    _require(
        rows_grad.dim() == 2 and _sym_eq(rows_grad.shape[0], rows.shape[0]), op,
        lambda: f"rows_grad must have shape ({_int(rows.shape[0])}, dim), got {_shape(rows_grad.shape)}",
    )
    _require(n_rows >= 0, op, lambda: f"n_rows must be >= 0, got {_int(n_rows)}")
    _same_device(op, rows, "rows", rows_grad, "rows_grad")


def _check_row_update(op: str, param: Tensor, rows: Tensor, rows_grad: Tensor) -> None:
    """The sparse row gradient of a row optimizer's update: rows (U,) int64, rows_grad (U, dim)
    in param's dtype, both on param's device."""
    _require(
        rows.dim() == 1 and rows.dtype == torch.int64, op,
        lambda: f"rows must be a 1-D int64 tensor, got {rows.dim()}-D {dtype_name(rows.dtype)}",
    )
    _require(
        rows_grad.dim() == 2 and _sym_and(rows_grad.shape[0] == rows.shape[0], rows_grad.shape[1] == param.shape[1]),
        op,
        lambda: f"rows_grad must have shape ({_int(rows.shape[0])}, {_int(param.shape[1])}), "
        f"got {_shape(rows_grad.shape)}",
    )
    _require(
        rows_grad.dtype == param.dtype, op,
        lambda: f"rows_grad must have param's dtype {dtype_name(param.dtype)}, got {dtype_name(rows_grad.dtype)}",
    )
    _same_device(op, param, "param", rows, "rows")
    _same_device(op, param, "param", rows_grad, "rows_grad")


def check_row_adam(
    param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, rows: Tensor, rows_grad: Tensor,
    beta1: float, beta2: float, step: int, op: str = "row_adam_",
) -> None:
    """check_row_adam_args of checks.h: param (n_rows, dim) contiguous floating; moments
    contiguous, param's shape, in accumulation_dtype(param.dtype); rows (U,) int64;
    rows_grad (U, dim) in param's dtype; one device; betas in [0, 1); step >= 1. op names
    the caller in errors."""
    _require(
        param.dim() == 2 and param.is_contiguous(), op,
        lambda: f"param must be a contiguous 2-D tensor, got shape {_shape(param.shape)}",
    )
    _require(
        param.dtype.is_floating_point, op, lambda: f"param must be floating point, got {dtype_name(param.dtype)}"
    )
    state = accumulation_dtype(param.dtype)
    for t in (exp_avg, exp_avg_sq):
        _require(
            _sym_and(_sym_eq(tuple(t.shape), tuple(param.shape)), t.is_contiguous(), t.dtype == state), op,
            lambda t=t: f"exp_avg and exp_avg_sq must be contiguous {dtype_name(state)} tensors of param's shape "
            f"{_shape(param.shape)}, got {dtype_name(t.dtype)} {_shape(t.shape)}",
        )
        _same_device(op, param, "param", t, "optimizer state")
    _check_row_update(op, param, rows, rows_grad)
    _require(
        bool(0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0), op,
        lambda: f"betas must be in [0, 1), got {_float(beta1)} and {_float(beta2)}",
    )
    _require(step >= 1, op, lambda: f"step must be >= 1, got {_int(step)}")


def check_row_adam_capturable(
    param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, rows: Tensor, rows_grad: Tensor,
    beta1: float, beta2: float,
) -> None:
    """check_row_adam_capturable_args of checks.h: row_adam_'s checks, and the step count a
    0-d int64 tensor on param's device (its value is checked where it is read)."""
    op = "row_adam_capturable_"
    check_row_adam(param, exp_avg, exp_avg_sq, rows, rows_grad, beta1, beta2, 1, op=op)
    _require(
        step.dim() == 0 and step.dtype == torch.int64, op,
        lambda: f"step must be a 0-d int64 tensor (the step count), got a {step.dim()}-D "
        f"{dtype_name(step.dtype)} tensor",
    )
    _same_device(op, param, "param", step, "step")


def check_row_adagrad(
    param: Tensor, sum_sq: Tensor, rows: Tensor, rows_grad: Tensor, lr: float, eps: float, weight_decay: float,
) -> None:
    """check_row_adagrad_args of checks.h: param (n_rows, dim) contiguous float; sum_sq
    (n_rows,) contiguous in accumulation_dtype(param.dtype); rows (U,) int64; rows_grad
    (U, dim) in param's dtype; one device; lr >= 0, eps > 0, weight_decay >= 0, finite."""
    op = "row_adagrad_"
    _require(
        param.dim() == 2 and param.is_contiguous(), op,
        lambda: f"param must be a contiguous 2-D tensor, got shape {_shape(param.shape)}",
    )
    _require(
        param.dtype in VALUE_DTYPES, op,
        lambda: f"param must be float32, bfloat16, float16 or float64, got {dtype_name(param.dtype)}",
    )
    state = accumulation_dtype(param.dtype)
    _require(
        sum_sq.dim() == 1 and _sym_eq(sum_sq.shape[0], param.shape[0]), op,
        lambda: f"sum_sq must have shape [{_int(param.shape[0])}] (one value per row of param), "
        f"got {_shape(sum_sq.shape)}",
    )
    _require(
        sum_sq.dtype == state, op,
        lambda: f"sum_sq must be {dtype_name(state)} (the accumulation dtype of {dtype_name(param.dtype)} params), "
        f"got {dtype_name(sum_sq.dtype)}",
    )
    _require(
        sum_sq.is_contiguous(), op, lambda: f"sum_sq must be contiguous, got strides {_shape(sum_sq.stride())}"
    )
    _same_device(op, param, "param", sum_sq, "sum_sq")
    _check_row_update(op, param, rows, rows_grad)
    _require(bool(math.isfinite(lr) and lr >= 0.0), op, lambda: f"lr must be finite and >= 0, got {_float(lr)}")
    _require(bool(math.isfinite(eps) and eps > 0.0), op, lambda: f"eps must be finite and > 0, got {_float(eps)}")
    _require(
        bool(math.isfinite(weight_decay) and weight_decay >= 0.0), op,
        lambda: f"weight_decay must be finite and >= 0, got {_float(weight_decay)}",
    )


def check_pk_topk(query: Tensor, keys: Tensor, k: int, op: str = "pk_topk") -> None:
    """check_pk_topk_args of checks.h: query (tokens, heads, 2 * half); keys (heads, 2,
    n_keys, half), same float dtype and device; 1 <= k <= n_keys. No device limits: what
    the fused CUDA kernel cannot take, it hands to pk_topk_by_sorting."""
    _require(
        query.dim() == 3, op, lambda: f"query must be 3-D (tokens, heads, 2 * half), got shape {_shape(query.shape)}"
    )
    _require(
        keys.dim() == 4 and _sym_eq(keys.shape[1], 2), op,
        lambda: f"keys must be 4-D (heads, 2, n_keys, half), got shape {_shape(keys.shape)}",
    )
    _require(
        query.shape[2] % 2 == 0, op, lambda: f"query width must be even (two halves), got {_int(query.shape[2])}"
    )
    _require(
        _sym_eq(query.shape[1], keys.shape[0]), op,
        lambda: f"query has {_int(query.shape[1])} heads but keys has {_int(keys.shape[0])}",
    )
    _require(
        _sym_eq(query.shape[2] // 2, keys.shape[3]), op,
        lambda: f"query half width {_int(query.shape[2] // 2)} does not match the sub-key width {_int(keys.shape[3])}",
    )
    _require(
        query.dtype == keys.dtype, op,
        lambda: f"query and keys must have the same dtype, got {dtype_name(query.dtype)} and {dtype_name(keys.dtype)}",
    )
    _require(
        query.dtype in VALUE_DTYPES, op,
        lambda: f"query must be float32, bfloat16, float16 or float64, got {dtype_name(query.dtype)}",
    )
    _same_device(op, query, "query", keys, "keys")
    _require(
        _sym_and(k >= 1, k <= keys.shape[2]), op, lambda: f"k must be in [1, n_keys = {_int(keys.shape[2])}], got {_int(k)}"
    )


# Bytes after a packed quantized row's codes (quantized_row_tail_bytes of checks.h): a float32
# scale, and a float32 bias for uint8 codes.
QUANTIZED_ROW_TAIL_BYTES = {"uint8": 8, "float8_e4m3fn": 4}


def check_quantized_embedding_bag(
    packed: Tensor, indices: Tensor, weights: Tensor, codes: str, out_dtype: torch.dtype
) -> None:
    """check_quantized_embedding_bag_args of checks.h: packed (rows, dim + tail) uint8 rows;
    indices (tokens, bag) int32/int64; weights (tokens, bag) float32; out_dtype float32,
    bfloat16 or float16; one device."""
    op = "quantized_embedding_bag"
    tail = QUANTIZED_ROW_TAIL_BYTES.get(codes, 0)
    _require(tail > 0, op, lambda: f'codes must be "uint8" or "float8_e4m3fn", got "{codes}"')
    what = " and bias" if tail == 8 else ""
    _require(
        packed.dim() == 2 and packed.dtype == torch.uint8, op,
        lambda: f"packed must be a 2-D uint8 tensor of rows (codes, then the float32 scale{what}), "
        f"got {dtype_name(packed.dtype)} of shape {_shape(packed.shape)}",
    )
    _require(
        packed.shape[1] >= tail, op,
        lambda: f"packed rows of {codes} codes end with {tail} bytes of scale{what}, so they need at least "
        f"{tail} bytes, got {_int(packed.shape[1])}",
    )
    _check_bag_shape(op, indices, weights)
    _require(
        indices.dtype in (torch.int64, torch.int32), op,
        lambda: f"indices must be int64 or int32, got {dtype_name(indices.dtype)}",
    )
    _require(weights.dtype == torch.float32, op, lambda: f"weights must be float32, got {dtype_name(weights.dtype)}")
    _require(
        out_dtype in (torch.float32, torch.bfloat16, torch.float16), op,
        lambda: f"out_dtype must be float32, bfloat16 or float16, got {dtype_name(out_dtype)}",
    )
    _check_lookups(op, packed, "packed", indices, weights)

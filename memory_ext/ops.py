"""Typed wrappers of ``torch.ops.memory.*``, with their fake kernels and autograd.

The schemas live in csrc/ops.cpp and the kernels in csrc/cpu and csrc/cuda; this module
adds what ``torch.compile`` (fake kernels) and autograd need. The fake kernels run the
ops' argument checks (memory_ext._checks), so a bad call fails while tracing with the
message the kernel would give. Gradients are computed by the library's own atomic-free
kernels, so they are bitwise reproducible.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from memory_ext import _C, _checks
from memory_ext._checks import accumulation_dtype

__all__ = [
    "embedding_bag",
    "embedding_bag_backward",
    "embedding_bag_backward_dense",
    "embedding_bag_backward_padded",
    "rows_to_dense",
    "pk_topk",
    "pk_topk_by_sorting",
    "quantized_embedding_bag",
    "row_adam_",
    "row_adagrad_",
    "set_index_checks",
    "index_checks_enabled",
    "index_check_mode",
    "index_checks",
    "check_errors",
    "accumulation_dtype",
    "advise_huge_pages",
    "cpu_buffer_cache_bytes",
    "release_cpu_buffers",
]

_ops = torch.ops.memory


def embedding_bag(values: Tensor, indices: Tensor, weights: Tensor, *, check_indices: bool = True) -> Tensor:
    """Weighted bag of rows: out[t] = sum_j weights[t, j] * values[indices[t, j]].

    values: (rows, dim) float32/bfloat16/float16/float64; indices: (tokens, bag) int64 or
    int32; weights: (tokens, bag) float32 or values' dtype -> (tokens, dim) values' dtype.
    Accumulates in float32 (float64 for float64). Differentiable in values and weights.

    check_indices=False vouches that every index is in [0, rows) (indices made by the
    library, such as a memory layer's top-k over its own table): the CUDA kernel then
    skips its index report and the host synchronisation it costs (see set_index_checks);
    an index out of range all the same is skipped, never read. The CPU kernel checks
    either way, at no synchronisation cost.
    """
    return _ops.embedding_bag(values, indices, weights, check_indices)


def quantized_embedding_bag(
    packed: Tensor,
    indices: Tensor,
    weights: Tensor,
    codes: str,
    out_dtype: torch.dtype = torch.float32,
    *,
    check_indices: bool = True,
) -> Tensor:
    """Weighted bag of row-wise quantized rows, for inference (forward only).

    packed: (rows, dim + 8) uint8 for codes "uint8", each row its dim codes then a float32
    scale and bias (value = code * scale + bias: the layout of
    torch.ops.quantized.embedding_bag_byte_prepack), or (rows, dim + 4) for codes
    "float8_e4m3fn" (dim e4m3 codes then a float32 scale, value = code * scale); indices:
    (tokens, bag) int64 or int32; weights: (tokens, bag) float32 -> (tokens, dim) out_dtype
    (float32, bfloat16 or float16), accumulated in float32. memory_ext.nn.quantize_rows
    builds ``packed`` from a float table. check_indices as for embedding_bag.
    """
    return _ops.quantized_embedding_bag(packed, indices, weights, codes, out_dtype, check_indices)


def embedding_bag_backward(
    grad_out: Tensor, values: Tensor, indices: Tensor, weights: Tensor, need_weights_grad: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Sparse backward of embedding_bag in one pass over the touched rows.

    grad_out: (tokens, dim) -> rows: (U,) int64 unique touched rows, ascending;
    rows_grad: (U, dim) values' dtype, each row summed in input order in float32 (float64
    for float64); weights_grad: (tokens, bag) weights' dtype, or (0,) when
    need_weights_grad is False.
    """
    return _ops.embedding_bag_backward(grad_out, values, indices, weights, need_weights_grad)


def embedding_bag_backward_dense(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    weights: Tensor,
    need_weights_grad: bool = True,
    *,
    check_indices: bool = True,
) -> tuple[Tensor, Tensor]:
    """embedding_bag_backward with the row gradient in dense form, for dense table gradients.

    -> grad_values: (rows, dim) values' dtype, bit for bit
    ``rows_to_dense(*embedding_bag_backward(...)[:2], rows)``; weights_grad as there. On CUDA
    it never waits for the device (the sparse form must, to size its output), so a
    training step with a dense table gradient can be captured in a CUDA graph; the
    autograd of embedding_bag and of pk_topk's keys use it. check_indices as for
    embedding_bag: False skips the index report (out-of-range lookups add nothing and get
    a zero weight gradient); True in the "sync" mode reads the report back, a host
    synchronisation. The CPU kernel checks either way.
    """
    return _ops.embedding_bag_backward_dense(grad_out, values, indices, weights, need_weights_grad, check_indices)


def embedding_bag_backward_padded(
    grad_out: Tensor, values: Tensor, indices: Tensor, weights: Tensor, need_weights_grad: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """embedding_bag_backward with outputs of a size known before the call, for a step of
    fixed shapes (CUDA-graph capture; torch.compile without data-dependent sizes).

    -> rows: (capacity,) int64, capacity = min(tokens * bag, values.shape[0]): the rows of
    embedding_bag_backward, then -1; rows_grad: (capacity, dim) its rows_grad, bit for bit,
    then zero rows; weights_grad as there; count: 0-d int64 on the inputs' device, the
    rows before the padding. On CUDA nothing waits for the device. row_adam_ and
    row_adagrad_ take the padded rows as they are (they skip the -1s).

    An index of -1 is padding: it adds nothing and gets a zero weight gradient. So the
    padded outputs of several calls on one table are merged, rows summed, by one more call:
    ``embedding_bag_backward_padded(torch.cat(grads), table, torch.cat(rows)[:, None],
    ones, False)``. Any other index must be in range: the CPU kernel raises for it; the
    CUDA kernel cannot without waiting, and skips it like -1 (the forward's check is the
    one that reports bad indices).
    """
    return _ops.embedding_bag_backward_padded(grad_out, values, indices, weights, need_weights_grad)


def rows_to_dense(rows: Tensor, rows_grad: Tensor, n_rows: int, *, check_rows: bool = True) -> Tensor:
    """Dense (n_rows, dim) tensor with rows_grad[u] at row rows[u] and zeros elsewhere.

    rows: (U,) int64 strictly ascending in [0, n_rows). check_rows=False vouches for that
    (rows returned by embedding_bag_backward): the CUDA kernel then skips their check and
    its host synchronisation. The CPU kernel checks either way."""
    return _ops.rows_to_dense(rows, rows_grad, n_rows, check_rows)


def pk_topk(query: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact product-key top-k.

    query: (tokens, heads, 2 * half); keys: (heads, 2, n_keys, half); 1 <= k <= n_keys ->
    scores: (tokens, heads, k) float32 (float64 for float64 inputs), descending, each
    q1 . K1[i] + q2 . K2[j]; indices: (tokens, heads, k) int64, i * n_keys + j.
    Differentiable in query and keys through the selected pairs.

    float32 on CUDA follows torch's rule for float32 matmuls. With
    ``torch.get_float32_matmul_precision()`` at "high" or "medium", on compute capability
    8.0 or newer and for half <= 1024, the halves are scored on TF32 tensor cores: every
    element of query and keys is rounded to TF32 (10 mantissa bits, to nearest, ties away
    from zero); each half-score q_x . K_x[i] accumulates the products of the rounded
    elements in float32, in the order and with the intermediate rounding of the tensor
    cores; a returned score is the float32 sum of its two half-scores, and the top k is
    exact over these scores. Each then differs from the exact q1 . K1[i] + q2 . K2[j] by at
    most 2^-9 * (sum |q1 * K1[i]| + sum |q2 * K2[j]|). At "highest" (torch's default), and
    for larger halves or older GPUs, float32 is scored with float32 FMAs in dimension order.
    On the CPU, calls of 64 tokens or more with n_keys a multiple of 32 (up to 65536) are
    scored by our kernels where the CPU has them:
    float32 (and float16) with float32 FMAs in dimension order (AVX-512), bf16 with its
    products exact in float32 (AMX or AVX512-BF16); the same bits at any thread count.
    Other calls are scored by torch's GEMM on the inputs converted to float32 (float64).

    Ties go to the lower index when the tied sums come from tied half-scores (so with
    exactly representable sums the order is score descending, then index ascending); the
    order of sums equal only after rounding is not specified. Non-finite half-scores: NaN
    ranks first (as in torch.topk), but which NaN pairs are returned is not specified; a
    +inf half-score met by a -inf one sums to NaN, and that pair may or may not be among
    those returned. On CUDA, what the fused kernels cannot take (n_keys > 65536, heads >
    65535, or a k beyond their shared memory, about k > 512) goes to pk_topk_by_sorting:
    the same contract, slower (its half-scores come from torch's matmul, TF32 under the
    same precision rule).
    """
    return _ops.pk_topk(query, keys, k)


def pk_topk_by_sorting(query: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """pk_topk's contract (shapes, dtypes, exact top-k, equal sums to the lower index)
    computed with ATen ops on any device and for any k <= n_keys: each half-score row
    from a batched matmul, sorted stably, then the pairs of ranks (a, b) with
    (a + 1) * (b + 1) <= k (about k ln k of them, which hold the exact top-k) sorted by
    index, then stably by score. The CUDA pk_topk takes this path when k needs more shared
    memory than its fused kernel has; it is slower than the fused kernels and needs
    memory for tokens x heads x (k ln k) candidates (processed in chunks). Differentiable
    in query and keys, with pk_topk's gradient.
    """
    return _ops.pk_topk_by_sorting(query, keys, k)


def row_adam_(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    rows: Tensor,
    rows_grad: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int | Tensor,
) -> None:
    """In-place AdamW update of the rows of a sparse gradient (lazy Adam): only param rows
    ``rows`` and their moments change.

    param: (n_rows, dim); exp_avg, exp_avg_sq: (n_rows, dim) float32 (float64 for float64
    params); rows: (U,) int64, strictly ascending, optionally followed by -1 padding
    (skipped: the rows of embedding_bag_backward_padded); rows_grad: (U, dim) in param's dtype.
    step, the optimizer's step count for the bias correction: an int >= 1, the count this
    update uses (``torch.ops.memory.row_adam_``); or a 0-d int64 tensor on param's device
    holding the steps taken (>= 0), which the call advances by one and whose new count the
    update uses (``torch.ops.memory.row_adam_capturable_``): nothing is then read on the
    host, so on CUDA the call can be captured in a CUDA graph and each replay takes the next
    count (torch.optim.Adam's ``capturable=True``; SparseRowAdam uses it for CUDA tables).
    Both give the same update for the same count: bit for bit on the CPU; on CUDA the
    tensor count's coefficients are computed by the device, whose double-precision pow may
    round a coefficient's last bit differently from the host's. torch.optim.AdamW's
    per-element formula; no reductions, so results do not depend on threads. Bumps the
    version counters of the updated tensors (calling the torch.ops directly does not). The
    CPU kernel checks ``rows`` and the count; the CUDA kernel trusts them (duplicate rows
    would race) and skips rows out of range.
    """
    hyper = (lr, beta1, beta2, eps, weight_decay)
    if isinstance(step, Tensor):
        _ops.row_adam_capturable_(param, exp_avg, exp_avg_sq, step, rows, rows_grad, *hyper)
        updated = (param, exp_avg, exp_avg_sq, step)
    else:
        _ops.row_adam_(param, exp_avg, exp_avg_sq, rows, rows_grad, *hyper, step)
        updated = (param, exp_avg, exp_avg_sq)
    # Tell autograd the tensors changed, so that a graph which saved the table (a forward
    # not yet backpropagated) raises instead of using the updated rows.
    torch.autograd.graph.increment_version(updated)


def row_adagrad_(
    param: Tensor,
    sum_sq: Tensor,
    rows: Tensor,
    rows_grad: Tensor,
    *,
    lr: float,
    eps: float,
    weight_decay: float,
) -> None:
    """In-place row-wise Adagrad update of the rows of a sparse gradient: only param rows
    ``rows`` and their accumulators change.

    param: (n_rows, dim); sum_sq: (n_rows,) float32 (float64 for float64 params), one value
    per row (FBGEMM's row-wise Adagrad: a table's optimizer state is 1/dim of Adam's);
    rows: (U,) int64, strictly ascending, optionally followed by -1 padding (skipped: the
    rows of embedding_bag_backward_padded); rows_grad: (U, dim) in param's dtype; lr >= 0,
    eps > 0, weight_decay >= 0. For each u, with r = rows[u] and g = rows_grad[u]:
    ``sum_sq[r] += mean(g ** 2)``, then ``param[r] = param[r] * (1 - lr * weight_decay) -
    lr * g / (sqrt(sum_sq[r]) + eps)``, in float32 (float64 for float64) and rounded once to
    param's dtype. The CPU kernel sums a row's squares in element order, so results do not
    depend on threads; the CUDA kernel sums them in a fixed order of its own (repeatable,
    last bits may differ from the CPU's). Bumps the version counters of the updated tensors
    (calling ``torch.ops.memory.row_adagrad_`` directly does not). The CPU kernel checks
    ``rows``; the CUDA kernel trusts them to be unique and skips rows out of range.
    """
    _ops.row_adagrad_(param, sum_sq, rows, rows_grad, lr, eps, weight_decay)
    torch.autograd.graph.increment_version((param, sum_sq))


def advise_huge_pages(t: Tensor) -> Tensor:
    """Ask the kernel for transparent huge pages on t's memory; returns t.

    For large CPU tables and optimizer states, called before their first write: rows read
    at random then cost no page walk each (a 4 GiB table on 4 KiB pages has 8 MiB of
    page-table entries), and the first write faults 2 MiB at a time. A hint: where the
    system has transparent huge pages off, on other devices, for fake tensors and for
    tensors under 8 MiB it does nothing."""
    if t.device.type == "cpu" and t.is_contiguous() and t.numel() and not is_fake(t):
        _C.advise_huge_pages(t.data_ptr(), t.nbytes)
    return t


def cpu_buffer_cache_bytes() -> int:
    """Bytes the CPU kernels hold in free blocks for their next large outputs.

    Outputs of 8 MiB and more (sparse row gradients, rows_to_dense, large gathers) take
    their memory from blocks earlier outputs gave back, so the steps of a training loop
    after the first write into memory that is already mapped: no page faults and no kernel
    zeroing of fresh pages (a fifth of the sparse backward's time at 2^20 x 512 float32).
    The free blocks are capped by the environment variable MEMORY_EXT_CPU_BUFFER_CACHE_MB
    (read once, default 4096; 0 turns the reuse off)."""
    return int(_C.cpu_buffer_cache_bytes())


def release_cpu_buffers() -> int:
    """Give the free blocks of cpu_buffer_cache_bytes() back to the system; returns their
    bytes. Blocks still held by live tensors return to the pool when those are freed."""
    return int(_C.release_cpu_buffers())


def set_index_checks(enabled: bool | str) -> None:
    """The mode of index validation on devices where it costs a host sync (CUDA).

    True or "sync" (the default): an out-of-range index raises an error naming the op,
    the index and the row count, at the call, which waits for the device once to learn
    it. "async": the call does not wait; the device records the first bad index of every
    checked call, and check_errors() raises it later with the same message (call it
    every few steps, or at the end of an epoch; a device records its first error only,
    until check_errors() clears it; make one call before capturing a CUDA graph, which
    allocates the record). False or "off": no report. Whatever the mode, CUDA kernels
    never read out of bounds and treat an out-of-range lookup as absent (it adds nothing
    and gets a zero weight gradient). embedding_bag_backward waits for the device anyway to size
    its outputs, so it raises at the call in both sync and async modes. Process-wide; the
    CPU kernels always check at the call (it costs them no synchronisation).
    """
    if isinstance(enabled, bool):
        _ops.set_index_checks(enabled)
    else:
        _ops.set_index_check_mode(str(enabled))


def index_checks_enabled() -> bool:
    """Whether bad indices are reported at all (mode "sync" or "async"; see set_index_checks)."""
    return bool(_ops.index_checks_enabled())


def index_check_mode() -> str:
    """The mode of index validation: "sync", "async" or "off" (see set_index_checks)."""
    return str(_ops.index_check_mode())


def check_errors() -> None:
    """Raises the first out-of-range index that CUDA calls recorded in "async" mode since
    the last check_errors(), with the message the call would have raised in "sync" mode,
    and clears it; returns None when there is none. Waits for each device that has made
    such a call. (CPU calls raise at the call in every mode, so they record nothing.)"""
    _ops.check_index_errors()


@contextlib.contextmanager
def index_checks(enabled: bool | str) -> Iterator[None]:
    """Context manager: index validation in mode ``enabled`` inside the block (see
    set_index_checks), the previous mode restored after.

    ``with memory_ext.ops.index_checks(False): out = memory_ext.ops.embedding_bag(...)``
    """
    previous = index_check_mode()
    set_index_checks(enabled)
    try:
        yield
    finally:
        set_index_checks(previous)


# ---------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only, for torch.compile and meta tensors. Each runs the
# op's argument checks first (memory_ext._checks: the kernels' checks and messages), so
# that a bad call fails at trace time with the error the real kernel would raise.


@torch.library.register_fake("memory::embedding_bag")
def _embedding_bag_fake(values, indices, weights, check_indices=True):
    _checks.check_embedding_bag("embedding_bag", values, indices, weights)
    return values.new_empty((indices.shape[0], values.shape[1]))


@torch.library.register_fake("memory::embedding_bag_backward")
def _embedding_bag_backward_fake(grad_out, values, indices, weights, need_weights_grad):
    _checks.check_embedding_bag_backward(grad_out, values, indices, weights)
    n_unique = torch.library.get_ctx().new_dynamic_size()
    rows = indices.new_empty((n_unique,), dtype=torch.int64)
    rows_grad = values.new_empty((n_unique, values.shape[1]))
    if need_weights_grad:
        weights_grad = weights.new_empty(indices.shape)
    else:
        weights_grad = weights.new_empty((0,))
    return rows, rows_grad, weights_grad


@torch.library.register_fake("memory::embedding_bag_backward_dense")
def _embedding_bag_backward_dense_fake(grad_out, values, indices, weights, need_weights_grad, check_indices=True):
    _checks.check_embedding_bag_backward(grad_out, values, indices, weights, "embedding_bag_backward_dense")
    weights_grad = weights.new_empty(indices.shape if need_weights_grad else (0,))
    return values.new_empty(values.shape), weights_grad


@torch.library.register_fake("memory::embedding_bag_backward_padded")
def _embedding_bag_backward_padded_fake(grad_out, values, indices, weights, need_weights_grad):
    _checks.check_embedding_bag_backward(grad_out, values, indices, weights, "embedding_bag_backward_padded")
    capacity = torch.sym_min(indices.numel(), values.shape[0])
    rows = indices.new_empty((capacity,), dtype=torch.int64)
    rows_grad = values.new_empty((capacity, values.shape[1]))
    weights_grad = weights.new_empty(indices.shape if need_weights_grad else (0,))
    return rows, rows_grad, weights_grad, indices.new_empty((), dtype=torch.int64)


@torch.library.register_fake("memory::rows_to_dense")
def _rows_to_dense_fake(rows, rows_grad, n_rows, check_rows=True):
    _checks.check_rows_to_dense(rows, rows_grad, n_rows)
    return rows_grad.new_empty((n_rows, rows_grad.shape[1]))


@torch.library.register_fake("memory::row_adam_")
def _row_adam_fake(param, exp_avg, exp_avg_sq, rows, rows_grad, lr, beta1, beta2, eps, weight_decay, step):
    _checks.check_row_adam(param, exp_avg, exp_avg_sq, rows, rows_grad, beta1, beta2, step)
    return None


@torch.library.register_fake("memory::row_adam_capturable_")
def _row_adam_capturable_fake(param, exp_avg, exp_avg_sq, step, rows, rows_grad, lr, beta1, beta2, eps, weight_decay):
    _checks.check_row_adam_capturable(param, exp_avg, exp_avg_sq, step, rows, rows_grad, beta1, beta2)
    return None


@torch.library.register_fake("memory::row_adagrad_")
def _row_adagrad_fake(param, sum_sq, rows, rows_grad, lr, eps, weight_decay):
    _checks.check_row_adagrad(param, sum_sq, rows, rows_grad, lr, eps, weight_decay)
    return None


@torch.library.register_fake("memory::pk_topk")
def _pk_topk_fake(query, keys, k):
    _checks.check_pk_topk(query, keys, k)
    shape = (query.shape[0], query.shape[1], k)
    return query.new_empty(shape, dtype=accumulation_dtype(query.dtype)), query.new_empty(shape, dtype=torch.int64)


@torch.library.register_fake("memory::pk_topk_by_sorting")
def _pk_topk_by_sorting_fake(query, keys, k):
    _checks.check_pk_topk(query, keys, k, "pk_topk_by_sorting")
    shape = (query.shape[0], query.shape[1], k)
    return query.new_empty(shape, dtype=accumulation_dtype(query.dtype)), query.new_empty(shape, dtype=torch.int64)


@torch.library.register_fake("memory::quantized_embedding_bag")
def _quantized_embedding_bag_fake(packed, indices, weights, codes, out_dtype, check_indices=True):
    _checks.check_quantized_embedding_bag(packed, indices, weights, codes, out_dtype)
    dim = packed.shape[1] - _checks.QUANTIZED_ROW_TAIL_BYTES[codes]
    return packed.new_empty((indices.shape[0], dim), dtype=out_dtype)


# ---------------------------------------------------------------------------------------
# Autograd.


# The gradient formulas below want dense gradients (autograd's contract for a dense
# parameter), so they take embedding_bag_backward_dense, which never waits for the device;
# the sparse and fused value paths (memory_ext.nn: sparse_lookup, fused_lookup) call the
# sparse form, whose output size costs one synchronisation. The indices are the forward's,
# checked there, or sub-key indices the library built from pk_topk's output:
# check_indices False.


def _embedding_bag_setup(ctx, inputs, output):
    values, indices, weights = inputs[:3]
    ctx.save_for_backward(values, indices, weights)


def _embedding_bag_grad(ctx, grad_out):
    values, indices, weights = ctx.saved_tensors
    need_values, _, need_weights = ctx.needs_input_grad[:3]
    if not need_values:
        # The weight gradient alone: the sparse form, whose row gradient is dropped
        # (it costs the sizing synchronisation; a frozen table with trained scores is rare).
        _, _, weights_grad = _ops.embedding_bag_backward(grad_out, values, indices, weights, True)
        return None, None, weights_grad, None
    grad_values, weights_grad = _ops.embedding_bag_backward_dense(
        grad_out, values, indices, weights, need_weights, False
    )
    return grad_values, None, weights_grad if need_weights else None, None


torch.library.register_autograd(
    "memory::embedding_bag", _embedding_bag_grad, setup_context=_embedding_bag_setup
)


def _pk_topk_setup(ctx, inputs, output):
    query, keys, _ = inputs
    _, indices = output
    ctx.save_for_backward(query, keys, indices)


def _pk_topk_grad(ctx, grad_scores, _grad_indices):
    # score = q1 . K1[i] + q2 . K2[j] is itself a bag of two sub-key rows, so both
    # gradients are embedding-bag kernels over the sub-key table (heads * 2 * n_keys, half):
    # grad_query is a weighted gather of the selected sub-keys, grad_keys the atomic-free,
    # deterministic scatter of the queries.
    query, keys, indices = ctx.saved_tensors
    tokens, heads, k = indices.shape
    n_keys, half = keys.shape[2], keys.shape[3]
    table = keys.reshape(heads * 2 * n_keys, half)
    head_base = (torch.arange(heads, device=indices.device) * (2 * n_keys)).view(1, heads, 1)
    idx1 = head_base + torch.div(indices, n_keys, rounding_mode="floor")
    idx2 = head_base + n_keys + torch.remainder(indices, n_keys)
    bag_idx = torch.stack((idx1, idx2), dim=2).reshape(tokens * heads * 2, k)
    bag_w = grad_scores.to(accumulation_dtype(keys.dtype)).unsqueeze(2).expand(tokens, heads, 2, k)
    bag_w = bag_w.reshape(tokens * heads * 2, k)
    grad_query = grad_keys = None
    if ctx.needs_input_grad[0]:
        grad_query = _ops.embedding_bag(table, bag_idx, bag_w, False).view(tokens, heads, 2 * half)
    if ctx.needs_input_grad[1]:
        grad_table, _ = _ops.embedding_bag_backward_dense(
            query.reshape(tokens * heads * 2, half), table, bag_idx, bag_w, False, False
        )
        grad_keys = grad_table.view(keys.shape)
    return grad_query, grad_keys, None


torch.library.register_autograd("memory::pk_topk", _pk_topk_grad, setup_context=_pk_topk_setup)
# The same contract, so the same gradient.
torch.library.register_autograd("memory::pk_topk_by_sorting", _pk_topk_grad, setup_context=_pk_topk_setup)


def _quantized_embedding_bag_grad(ctx, grad_out):
    raise RuntimeError(
        "memory.quantized_embedding_bag: forward only, it has no gradient (a quantized table serves inference; "
        "train the float table and quantize it afterwards)"
    )


torch.library.register_autograd(
    "memory::quantized_embedding_bag", _quantized_embedding_bag_grad, setup_context=lambda ctx, inputs, output: None
)

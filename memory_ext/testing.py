"""Helpers shared by the tests, the sanitizer cases and the benchmarks.

- ``cuda_skip_reason()``: why CUDA cases cannot run here (no GPU, or no CUDA kernels), or None.
- ``TOL`` and ``tolerance()``: how far a kernel's result may be from the float64 reference.
- ``sample_inputs(op, device, dtype, ...)``: seeded arguments of ``torch.ops.memory.<op>``,
  drawn on the device that will use them (a GPU benchmark does not draw its tables on the CPU).

No pytest here: the benchmarks import this module too.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import memory_ext
from memory_ext.nn.quantized import quantize_rows
from memory_ext.ops import accumulation_dtype

__all__ = [
    "BACKWARD_SEGMENT",
    "SAMPLE_OPS",
    "TOL",
    "UNIT_ROUNDOFF",
    "accumulation_dtype",
    "cuda_skip_reason",
    "generator",
    "op_args",
    "sample_inputs",
    "tolerance",
]

# Positions per backward work unit: a run of one row longer than this is split into
# segments whose partial sums are folded afterwards (kSegment in csrc/cpu/embedding_bag.cpp
# and csrc/cuda/embedding_bag_params.h).
BACKWARD_SEGMENT = {"cpu": 2048, "cuda": 512}


@functools.cache
def cuda_skip_reason() -> str | None:
    """Why CUDA cases cannot run in this process, or None when they can."""
    if not memory_ext.cuda_kernels_built():
        return "memory_ext was built without its CUDA kernels (CPU-only build or no nvcc)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


# ---------------------------------------------------------------------------------------
# Tolerances.

# Unit roundoff (half an ulp, relative) of each floating dtype.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def tolerance(dtype: torch.dtype, *, terms: int = 1, scale: float = 1.0, rounded_twice: bool = False) -> dict:
    """rtol/atol for a sum of ``terms`` products (each about ``scale`` in size, random signs)
    accumulated in ``accumulation_dtype(dtype)`` and rounded once to ``dtype``, against the
    float64 reference before rounding.

    rtol is the rounding to ``dtype`` (one rounding: the unit roundoff; ``rounded_twice``:
    both sides rounded, e.g. two kernels compared, so one ulp). atol is the accumulation
    error: each partial sum is rounded, the partial sums of random-sign terms grow like
    sqrt(i) * scale, so the error grows like terms * u_acc * scale; eight times that (at
    least four terms: products and the final rounding count too).
    A 16-bit result therefore gets its own rounding and a float32 accumulation error,
    never a 16-bit absolute error.
    """
    u_out = UNIT_ROUNDOFF[dtype]
    u_acc = UNIT_ROUNDOFF[accumulation_dtype(dtype)]
    rtol = (4.0 if rounded_twice else 2.0) * u_out
    atol = 8.0 * max(4, terms) * u_acc * scale
    return dict(rtol=rtol, atol=atol)


# A short sum (up to 128 terms of size about 1) per output dtype: the default of the tests.
TOL = {dtype: tolerance(dtype, terms=128) for dtype in UNIT_ROUNDOFF}


# ---------------------------------------------------------------------------------------
# Inputs.


def generator(device: str | torch.device, seed: int = 0) -> torch.Generator:
    """A generator on ``device`` (random numbers are drawn where they are used)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return torch.Generator(device=device).manual_seed(seed)


def _dyadic(shape, gen, device, dtype, levels=32) -> Tensor:
    """Integers in [-levels, levels] / levels: exact in every dtype; their products and
    sums are exact in float32 as long as they stay below 2^24 units."""
    return (torch.randint(-levels, levels + 1, shape, generator=gen, device=device).to(torch.float64) / levels).to(dtype)


def _draw(kind, shape, gen, device, dtype, levels=32) -> Tensor:
    if kind == "dyadic":
        return _dyadic(shape, gen, device, dtype, levels)
    return torch.randn(shape, generator=gen, device=device, dtype=accumulation_dtype(dtype)).to(dtype)


def _bag_indices(gen, device, rows, tokens, bag, index_dtype, pattern, hot):
    shape = (tokens, bag)
    if pattern == "all_equal":
        first = torch.randint(0, rows, (1,), generator=gen, device=device)
        indices = first.expand(shape).clone()
    elif pattern == "distinct":  # distinct as long as rows >= tokens * bag
        n = tokens * bag
        perm = torch.randperm(max(rows, n), generator=gen, device=device)[:n]
        indices = perm.remainder(rows).view(shape)
    elif pattern == "random":
        indices = torch.randint(0, rows, shape, generator=gen, device=device)
    else:
        raise ValueError(f"unknown index pattern {pattern!r}")
    if hot:  # a share of the lookups on rows 0..2: long runs, split into segments
        mask = torch.rand(shape, generator=gen, device=device) < hot
        hot_rows = torch.randint(0, min(3, rows), shape, generator=gen, device=device)
        indices = torch.where(mask, hot_rows, indices)
    return indices.to(index_dtype)


def _embedding_bag(device, dtype, gen, *, tokens=8, bag=5, rows=30, dim=16, index_dtype=torch.int64,
                   weight_dtype=None, pattern="random", hot=0.0, kind="gaussian"):
    weight_dtype = weight_dtype or accumulation_dtype(dtype)
    values = _draw(kind, (rows, dim), gen, device, dtype)
    indices = _bag_indices(gen, device, rows, tokens, bag, index_dtype, pattern, hot)
    weights = _draw(kind, (tokens, bag), gen, device, weight_dtype, levels=8)
    return dict(values=values, indices=indices, weights=weights)


def _embedding_bag_backward(device, dtype, gen, *, need_weights_grad=True, grad_dtype=None, **shape):
    bag = _embedding_bag(device, dtype, gen, **shape)
    tokens, dim = bag["indices"].shape[0], bag["values"].shape[1]
    grad_out = _draw(shape.get("kind", "gaussian"), (tokens, dim), gen, device, grad_dtype or dtype)
    return dict(grad_out=grad_out, **bag, need_weights_grad=need_weights_grad)


def _rows_to_dense(device, dtype, gen, *, n_rows=100, n_unique=None, dim=16):
    n_unique = min(n_rows, n_rows // 3 + 1) if n_unique is None else n_unique
    rows = torch.randperm(n_rows, generator=gen, device=device)[:n_unique].sort().values
    if dtype.is_floating_point:
        rows_grad = _draw("gaussian", (n_unique, dim), gen, device, dtype)
    else:
        rows_grad = torch.randint(1, 100, (n_unique, dim), generator=gen, device=device).to(dtype)
    return dict(rows=rows, rows_grad=rows_grad, n_rows=n_rows)


def _pk_topk(device, dtype, gen, *, tokens=6, heads=2, n_keys=16, half=8, k=4, kind="gaussian"):
    """kind: gaussian (keys scaled so that scores are about 1), dyadic (integers / 32: every
    score exact in float32, so results are exact), ties (values in {-1, 0, 1}: constant ties)."""
    q_shape, k_shape = (tokens, heads, 2 * half), (heads, 2, n_keys, half)
    if kind == "ties":
        query = _dyadic(q_shape, gen, device, dtype, levels=1)
        keys = _dyadic(k_shape, gen, device, dtype, levels=1)
    elif kind == "dyadic":
        query, keys = _dyadic(q_shape, gen, device, dtype), _dyadic(k_shape, gen, device, dtype)
    elif kind == "gaussian":
        acc = accumulation_dtype(dtype)
        query = torch.randn(q_shape, generator=gen, device=device, dtype=acc).to(dtype)
        keys = (torch.randn(k_shape, generator=gen, device=device, dtype=acc) / half**0.5).to(dtype)
    else:
        raise ValueError(f"unknown pk_topk input kind {kind!r}")
    return dict(query=query, keys=keys, k=k)


def _row_adam_(device, dtype, gen, *, n_rows=64, dim=16, n_unique=None, step=3, lr=0.01, beta1=0.9, beta2=0.95,
               eps=1e-8, weight_decay=0.1):
    sample = _rows_to_dense(device, dtype, gen, n_rows=n_rows, n_unique=n_unique, dim=dim)
    moment = accumulation_dtype(dtype)
    param = _draw("gaussian", (n_rows, dim), gen, device, dtype)
    exp_avg = torch.randn((n_rows, dim), generator=gen, device=device, dtype=moment) * 0.1
    exp_avg_sq = torch.rand((n_rows, dim), generator=gen, device=device, dtype=moment) * 0.01
    return dict(param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, rows=sample["rows"], rows_grad=sample["rows_grad"],
                lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)


def _row_adam_capturable_(device, dtype, gen, *, step=2, **options):
    """row_adam_'s inputs with the step count as a 0-d int64 tensor (the steps taken before
    the call, so the update uses step + 1), in the op's argument order."""
    s = _row_adam_(device, dtype, gen, **options)
    count = torch.tensor(step, dtype=torch.int64, device=device)
    del s["step"]
    return dict(param=s.pop("param"), exp_avg=s.pop("exp_avg"), exp_avg_sq=s.pop("exp_avg_sq"), step=count, **s)


def _row_adagrad_(device, dtype, gen, *, n_rows=64, dim=16, n_unique=None, lr=0.05, eps=1e-10, weight_decay=0.01):
    sample = _rows_to_dense(device, dtype, gen, n_rows=n_rows, n_unique=n_unique, dim=dim)
    param = _draw("gaussian", (n_rows, dim), gen, device, dtype)
    sum_sq = torch.rand((n_rows,), generator=gen, device=device, dtype=accumulation_dtype(dtype)) * 0.1
    return dict(param=param, sum_sq=sum_sq, rows=sample["rows"], rows_grad=sample["rows_grad"], lr=lr, eps=eps,
                weight_decay=weight_decay)


def _quantized_embedding_bag(device, dtype, gen, *, tokens=8, bag=5, rows=30, dim=16, index_dtype=torch.int64,
                             codes="uint8", pattern="random", hot=0.0):
    """dtype is the output dtype (float32, bfloat16 or float16); the table is drawn in float32
    and packed by quantize_rows."""
    table = _draw("gaussian", (rows, dim), gen, device, torch.float32)
    indices = _bag_indices(gen, device, rows, tokens, bag, index_dtype, pattern, hot)
    weights = _draw("gaussian", (tokens, bag), gen, device, torch.float32)
    return dict(packed=quantize_rows(table, codes), indices=indices, weights=weights, codes=codes, out_dtype=dtype)


_SAMPLERS: dict[str, Callable[..., dict[str, Any]]] = {
    "embedding_bag": _embedding_bag,
    "embedding_bag_backward": _embedding_bag_backward,
    "embedding_bag_backward_dense": _embedding_bag_backward,
    "embedding_bag_backward_padded": _embedding_bag_backward,
    "rows_to_dense": _rows_to_dense,
    "pk_topk": _pk_topk,
    "pk_topk_by_sorting": _pk_topk,
    "row_adam_": _row_adam_,
    "row_adam_capturable_": _row_adam_capturable_,
    "row_adagrad_": _row_adagrad_,
    "quantized_embedding_bag": _quantized_embedding_bag,
}
SAMPLE_OPS = tuple(_SAMPLERS)


def sample_inputs(op: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *, seed: int = 0,
                  **options: Any) -> dict[str, Any]:
    """Arguments of ``torch.ops.memory.<op>`` by name, in schema order, drawn on ``device``
    from a generator seeded with ``seed``; ``dtype`` is the dtype of the table (values,
    keys, param, rows_grad).

    Options (defaults are small shapes):
      embedding_bag: tokens, bag, rows, dim, index_dtype, weight_dtype (default float32,
        float64 for float64), pattern ("random", "all_equal", "distinct"), hot (share of
        lookups on rows 0..2), kind ("gaussian", or "dyadic": sums exact in float32).
      embedding_bag_backward, embedding_bag_backward_dense, embedding_bag_backward_padded:
        those, plus need_weights_grad
        and grad_dtype.
      rows_to_dense: n_rows, n_unique, dim (any dtype, integers too).
      pk_topk, pk_topk_by_sorting: tokens, heads, n_keys, half, k, kind ("gaussian",
        "dyadic", "ties").
      row_adam_: n_rows, dim, n_unique, step and the hyperparameters.
      row_adam_capturable_: the same, step (default 2: the steps taken before the call)
        drawn as a 0-d int64 tensor.
      row_adagrad_: n_rows, dim, n_unique, lr, eps, weight_decay (sum_sq starts in [0, 0.1)).
      quantized_embedding_bag: tokens, bag, rows, dim, index_dtype, codes ("uint8",
        "float8_e4m3fn"), pattern, hot; dtype is the output dtype.
    """
    if op not in _SAMPLERS:
        raise ValueError(f"no sample inputs for {op!r}; known: {', '.join(SAMPLE_OPS)}")
    device = torch.device(device)
    return _SAMPLERS[op](device, dtype, generator(device, seed), **options)


def op_args(sample: dict[str, Any]) -> tuple:
    """The positional arguments of ``torch.ops.memory.<op>`` (e.g. for opcheck)."""
    return tuple(sample.values())

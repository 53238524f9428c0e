"""The paper's training recipe for value tables: own learning rate, own gradient clipping."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from memory_ext.distributed.groups import sharded_grad_square_norm
from memory_ext.nn import optimizer_guard
from memory_ext.nn.clipping import scale_to_norm_, square_norm
from memory_ext.nn.row_adagrad import SparseRowAdagrad
from memory_ext.nn.row_optimizer import RowOptimizer
from memory_ext.nn.sparse_adam import SparseRowAdam
from memory_ext.nn.values import MemoryValues
from memory_ext.sparse_rows import coalesced

__all__ = ["value_parameters", "value_tables", "param_groups", "clip_grad_norms", "value_optimizer"]


def value_parameters(model: nn.Module, *, sparse: bool | None = None) -> list[nn.Parameter]:
    """Parameters of every MemoryValues in model, each once (a shared pool counts once).

    sparse=True keeps only tables on the sparse or fused path, False only the dense ones."""
    # modules() yields a shared pool once, so each table appears once.
    return [p for m in value_tables(model) if sparse is None or _off_dense(m) == sparse for p in m.parameters()]


def value_tables(model: nn.Module) -> list[MemoryValues]:
    """Every MemoryValues in model, each once however many layers share it."""
    return [m for m in model.modules() if isinstance(m, MemoryValues)]


def _off_dense(table: MemoryValues) -> bool:
    return table.sparse_grad or table.fused is not None


_RULES = {"adam": SparseRowAdam, "adagrad": SparseRowAdagrad}


def value_optimizer(
    model: nn.Module,
    lr: float,
    *,
    rule: str = "adam",
    fused: bool = False,
    values_lr_scale: float = 10.0,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    max_norm: float | None = None,
    static_shapes: bool | None = None,
) -> RowOptimizer:
    """The optimizer of every value table in model, on a path whose cost follows the rows read.

    The other half of the recipe next to ``torch.optim.AdamW(param_groups(model, lr))``:
    give both the same base ``lr``; the values train at ``lr * values_lr_scale``, with no
    weight decay by default (the paper's values have none). Every table is switched to
    sparse gradients (``sparse_grad = True``), so a step writes and updates only the rows
    read, never O(n_rows) memory. rule "adam": SparseRowAdam (lazy AdamW, betas, two
    float32 moments per element); "adagrad": SparseRowAdagrad (one float per row; betas
    unused; it usually wants a larger values_lr_scale or lr than Adam).

    fused=True: each table is updated inside its backward instead (MemoryValues.fuse);
    no gradient is stored and ``step()`` has nothing to do for it (call it anyway, it
    costs nothing). Gradient clipping of the values then happens there: ``max_norm``
    clips each table's gradient of each backward pass (clip_grad_norms no longer sees
    them). Not for sharded tables. Without fused, clip with clip_grad_norms as usual.
    static_shapes (fused only; default: on CUDA tables): the fused update in tensors of
    sizes known before the step, so that a step can be captured in a CUDA graph (see
    MemoryValues.fuse).
    """
    if rule not in _RULES:
        raise ValueError(f"value_optimizer: unknown rule {rule!r}; expected one of {sorted(_RULES)}")
    if max_norm is not None and not fused:
        raise ValueError(
            "value_optimizer: max_norm applies to the fused path only, got fused=False "
            "(clip stored gradients with clip_grad_norms(model, max_norm, values_max_norm))"
        )
    if static_shapes is not None and not fused:
        raise ValueError(f"value_optimizer: static_shapes applies to the fused path only, got fused=False "
                         f"and static_shapes={static_shapes}")
    tables = value_tables(model)
    if not tables:
        raise ValueError("value_optimizer: the model has no MemoryValues")
    for t in tables:
        if t.sharded and (fused or rule != "adam"):
            raise ValueError(
                f"value_optimizer: a table sharded over a process group takes rule 'adam' without fusing, "
                f"got rule {rule!r}, fused={fused} (row-wise state and fused updates need whole rows)"
            )
    options = dict(lr=lr * values_lr_scale, eps=eps, weight_decay=weight_decay)
    if rule == "adam":
        options["betas"] = betas
    opt = _RULES[rule]([{"name": "values", "params": [t.weight for t in tables]}], **options)
    for t in tables:
        t.sparse_grad = True
        if fused:
            t.fuse(opt, max_norm=max_norm, static_shapes=static_shapes)
    return opt


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.1,
    values: str = "sparse",
    values_lr_scale: float = 10.0,
    values_weight_decay: float = 0.0,
) -> list[dict]:
    """Optimizer groups: "decay" (matrices), "no_decay" (biases, gains), and the value tables.

    values "sparse" (the default): the tables are left out, switched to sparse gradients,
    for ``value_optimizer(model, lr)`` to train (a dense optimizer stepping without one
    raises an error saying so). values "dense": they form a "values" group at ``lr *
    values_lr_scale`` with ``values_weight_decay``, with dense gradients: what a plain
    torch optimizer needs, at a cost of O(n_rows * dim) per step (the gradient written,
    then every row and both AdamW moments walked, whatever was read). A schedule that
    scales every group's lr by the same factor keeps the values on the same schedule at
    their own rate. Empty groups are left out.
    """
    if values not in ("sparse", "dense"):
        raise ValueError(f"param_groups: values must be 'sparse' or 'dense', got {values!r}")
    tables = value_tables(model)
    is_value = {id(p) for t in tables for p in t.parameters()}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in is_value]
    for t in tables:
        if values == "sparse":
            t.sparse_grad = True
            for p in t.parameters():
                optimizer_guard.expect_row_optimizer(p, others)
        elif t.fused is not None:
            raise ValueError(
                "param_groups: values='dense' but a table is fused with its row optimizer; unfuse() it first"
            )
        else:
            t.sparse_grad = False
    dense_values = [p for t in tables for p in t.parameters()] if values == "dense" else []
    decay, no_decay = [], []
    for p in others:
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"name": "values", "params": dense_values, "lr": lr * values_lr_scale, "weight_decay": values_weight_decay},
    ]
    return [g for g in groups if g["params"]]


def _present_grads(params: Iterable[nn.Parameter]) -> list[Tensor]:
    """The gradients of params that have one, sparse ones coalesced in place."""
    params = list(params)
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            # Layers sharing a pool add their sparse gradients by concatenation; the norm
            # needs each row once.
            p.grad = coalesced(p.grad)
    return [p.grad for p in params if p.grad is not None]


@torch.no_grad()
def clip_grad_norms(model: nn.Module, max_norm: float = 1.0, values_max_norm: float | None = None) -> tuple[Tensor, Tensor]:
    """Clip value-table and other gradients separately -> (other norm, values norm), 0-d device tensors.

    Each norm is the one before clipping. A sharded table counts with its whole gradient
    (all columns: sharded_grad_square_norm, a collective over its memory group bounded by
    its ``memory_shard.timeout``), so every rank of a group clips by the same factor; call
    it on every rank. Fused tables store no gradient: they are clipped in their backward
    (value_optimizer's max_norm) and are not part of the values norm.
    """
    values = value_parameters(model)
    is_value = {id(p) for p in values}
    sharded = {id(p) for m in model.modules() if isinstance(m, MemoryValues) and m.sharded for p in m.parameters()}
    others = _present_grads(p for p in model.parameters() if id(p) not in is_value)
    other_norm = square_norm(others).sqrt()
    scale_to_norm_(others, other_norm, max_norm)

    plain_values = _present_grads(p for p in values if id(p) not in sharded)
    sharded_values = _present_grads(p for p in values if id(p) in sharded)
    values_norm = (sharded_grad_square_norm(model) + square_norm(plain_values)).sqrt()
    values_max_norm = max_norm if values_max_norm is None else values_max_norm
    scale_to_norm_(plain_values + sharded_values, values_norm, values_max_norm)
    return other_norm, values_norm

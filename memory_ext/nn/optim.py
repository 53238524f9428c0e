"""The paper's training recipe for value tables: own learning rate, own gradient clipping."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from memory_ext.distributed.groups import sharded_grad_square_norm
from memory_ext.nn.sparse_adam import SparseRowAdam, coalesced
from memory_ext.nn.values import MemoryValues

__all__ = ["value_parameters", "param_groups", "clip_grad_norms", "sparse_value_optimizer"]


def value_parameters(model: nn.Module, *, sparse: bool | None = None) -> list[nn.Parameter]:
    """Parameters of every MemoryValues in model, each once (a shared pool counts once).

    sparse=True keeps only tables built with sparse_grad=True, False only the others."""
    # modules() yields a shared pool once, so each table appears once.
    return [
        p
        for m in model.modules()
        if isinstance(m, MemoryValues) and (sparse is None or m.sparse_grad == sparse)
        for p in m.parameters()
    ]


def sparse_value_optimizer(
    model: nn.Module,
    lr: float,
    *,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> SparseRowAdam:
    """A SparseRowAdam (lazy AdamW) over the value tables built with sparse_grad=True.

    A step updates only the rows read in that step (their moments included), so its cost
    follows the rows read, not the table size; rows not read keep their moments unchanged
    instead of decaying them. No weight decay by default (the paper's values have none).
    Use it next to an optimizer over ``param_groups(model, ...)``, which leaves these
    tables out; scale its lr like the dense values group (10x by default) yourself.
    """
    params = value_parameters(model, sparse=True)
    if not params:
        raise ValueError("sparse_value_optimizer: the model has no MemoryValues built with sparse_grad=True")
    return SparseRowAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.1,
    values_lr_scale: float = 10.0,
    values_weight_decay: float = 0.0,
) -> list[dict]:
    """Optimizer groups: "decay" (matrices), "no_decay" (biases, gains), "values" (lr * values_lr_scale).

    A schedule that scales every group's lr by the same factor keeps the values on the
    same schedule at their own rate. Empty groups are left out. Tables built with
    sparse_grad=True are left out entirely: dense optimizers cannot take their sparse
    gradients (see sparse_value_optimizer).
    """
    values = value_parameters(model, sparse=False)
    is_value = {id(p) for p in value_parameters(model)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in is_value:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"name": "values", "params": values, "lr": lr * values_lr_scale, "weight_decay": values_weight_decay},
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


def _square_norm(grads: list[Tensor]) -> Tensor:
    """Sum of squares of grads (a sparse one: of its stored values), float32 0-d (a CPU 0 when empty)."""
    total = torch.zeros((), dtype=torch.float32)
    for g in grads:
        total = torch.linalg.vector_norm(g._values() if g.is_sparse else g, dtype=torch.float32).square() + total
    return total


def _scale_to_norm_(grads: list[Tensor], norm: Tensor, max_norm: float) -> None:
    """Scale grads in place so that their joint norm ``norm`` becomes at most max_norm."""
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef)  # a 0-d factor keeps each grad's dtype


@torch.no_grad()
def clip_grad_norms(model: nn.Module, max_norm: float = 1.0, values_max_norm: float | None = None) -> tuple[Tensor, Tensor]:
    """Clip value-table and other gradients separately -> (other norm, values norm), 0-d device tensors.

    Each norm is the one before clipping. A sharded table counts with its whole gradient
    (all columns: sharded_grad_square_norm, a collective over its memory group bounded by
    its ``memory_shard.timeout``), so every rank of a group clips by the same factor; call
    it on every rank.
    """
    values = value_parameters(model)
    is_value = {id(p) for p in values}
    sharded = {id(p) for m in model.modules() if isinstance(m, MemoryValues) and m.sharded for p in m.parameters()}
    others = _present_grads(p for p in model.parameters() if id(p) not in is_value)
    other_norm = _square_norm(others).sqrt()
    _scale_to_norm_(others, other_norm, max_norm)

    plain_values = _present_grads(p for p in values if id(p) not in sharded)
    sharded_values = _present_grads(p for p in values if id(p) in sharded)
    values_norm = (sharded_grad_square_norm(model) + _square_norm(plain_values)).sqrt()
    values_max_norm = max_norm if values_max_norm is None else values_max_norm
    _scale_to_norm_(plain_values + sharded_values, values_norm, values_max_norm)
    return other_norm, values_norm

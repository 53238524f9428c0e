"""A check before every optimizer step, so that a value table on the sparse or fused path
never meets an optimizer that would skip it or choke on it without a clear error.

Registered (once, process-wide, through torch.optim's global step pre-hook) when the first
table leaves the dense path; a process whose tables are all dense never pays for it.
"""
from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from memory_ext.nn.row_optimizer import RowOptimizer, WeakIdSet, is_row_stepped

__all__ = ["watch", "expect_row_optimizer"]

_TABLES = WeakIdSet()  # MemoryValues on the sparse or fused path
# id(weight) -> (weakref of weight, ids of the parameters param_groups returned with it left out)
_AWAITING: dict[int, tuple[weakref.ref, frozenset[int]]] = {}
_hook = None


def watch(table) -> None:
    """Check every later optimizer step against this table (a MemoryValues off the dense path)."""
    global _hook
    _TABLES.add(table)
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_check_step)


def expect_row_optimizer(weight: torch.Tensor, companions: list[torch.Tensor]) -> None:
    """param_groups left this table out of the groups of ``companions``: a RowOptimizer must step it.

    Checked when an optimizer holding any of the companions steps."""
    key = id(weight)
    _AWAITING[key] = (weakref.ref(weight, lambda _: _AWAITING.pop(key, None)), frozenset(map(id, companions)))


def _check_step(optimizer, args, kwargs) -> None:
    if isinstance(optimizer, RowOptimizer) or not _TABLES:
        return
    name = type(optimizer).__name__
    tables = {id(t.weight): t for t in _TABLES}
    for group in optimizer.param_groups:
        for p in group["params"]:
            table = tables.get(id(p))
            if table is None:
                continue
            if table.fused is not None:
                raise ValueError(
                    f"{name}: a value table ({table.extra_repr()}) is updated in its own backward by a fused "
                    f"{type(table.fused.optimizer).__name__}; remove it from this optimizer (param_groups(model, ...) "
                    "leaves such tables out)"
                )
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(
                    f"{name}: a value table ({table.extra_repr()}) has a sparse gradient, which this optimizer "
                    "cannot step; train it with memory_ext.nn.value_optimizer(model, lr) (a SparseRowAdam), or "
                    "set the table's sparse_grad = False for a dense gradient"
                )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for t in _TABLES:
        p = t.weight
        ref, companions = _AWAITING.get(id(p), (None, frozenset()))
        if ref is None or ref() is not p or t.fused is not None or p.grad is None or is_row_stepped(p):
            continue
        if not companions.isdisjoint(held):
            raise ValueError(
                f"{name}: param_groups(model, ...) left a value table ({t.extra_repr()}) out of this optimizer "
                "for the sparse path, but no row optimizer steps it; build one with "
                "memory_ext.nn.value_optimizer(model, lr), or use param_groups(model, ..., values='dense')"
            )

"""RowOptimizer: the base of the optimizers that update only the rows of sparse gradients.

A subclass says how a set of rows is updated (``update_rows``); the base does the rest:
``step()`` coalesces each parameter's sparse gradient and updates its rows, and a value
table fused with the optimizer (see memory_ext.nn.fused) calls ``update_rows`` from its
backward instead, with no gradient stored at all. Both paths run the same function, so
fusing changes when the update happens, never what it computes.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import Tensor

from memory_ext import ops
from memory_ext.sparse_rows import coalesced

__all__ = ["RowOptimizer", "check_row_optimizer", "is_row_stepped", "WeakIdSet"]


class WeakIdSet:
    """A set of objects by identity that does not keep them alive. (weakref.WeakSet compares
    members with ==, which for tensors is elementwise and cannot answer membership.)"""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, obj) -> None:
        if obj in self:  # every lookup of a table adds it: keep the hot path to one dict read
            return
        key = id(obj)
        self._refs[key] = weakref.ref(obj, lambda _, key=key: self._refs.pop(key, None))

    def __contains__(self, obj) -> bool:
        ref = self._refs.get(id(obj))
        return ref is not None and ref() is obj

    def __iter__(self):
        return iter([obj for obj in (r() for r in list(self._refs.values())) if obj is not None])

    def __len__(self) -> int:
        return len(self._refs)


# Every parameter held by a live RowOptimizer (weak: optimizers and tables come and go).
_ROW_STEPPED = WeakIdSet()


def is_row_stepped(p: Tensor) -> bool:
    """Whether some RowOptimizer holds p."""
    return p in _ROW_STEPPED


def check_row_optimizer(who: str, optimizer, max_norm: float | None) -> None:
    """The arguments of everything that steps a table with a row optimizer and may clip its
    gradient first: optimizer a RowOptimizer, max_norm positive or None. who names the
    caller in the error."""
    if not isinstance(optimizer, RowOptimizer):
        raise ValueError(
            f"{who}: the optimizer must be a memory_ext.nn.RowOptimizer (SparseRowAdam, SparseRowAdagrad; "
            f"see value_optimizer), got {type(optimizer).__name__}"
        )
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"{who}: max_norm must be positive or None, got {max_norm}")


class RowOptimizer(torch.optim.Optimizer):
    """An optimizer over 2-D tables whose step costs in proportion to the rows in the gradient.

    A sparse COO gradient (``MemoryValues(sparse_grad=True)``) updates its rows only; a
    dense gradient counts as every row read. Parameters must be 2-D tables. Subclasses
    implement ``update_rows(p, group, rows, rows_grad)``.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], defaults: dict) -> None:
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(
                        f"{type(self).__name__}: parameters must be 2-D tables, got shape {tuple(p.shape)}"
                    )
                _ROW_STEPPED.add(p)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            _ROW_STEPPED.add(p)

    # Names of the per-parameter state tensors kept in the accumulation dtype (see load_state_dict).
    accumulated_state: tuple[str, ...] = ()

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the state tensors named in ``accumulated_state`` stay float32
        (float64 for float64 tables): torch's loader casts every state tensor to its
        parameter's dtype, which would round a bf16 table's moments to bf16 and stall it.
        A step count saved as a tensor (SparseRowAdam's capturable count) keeps its int64
        dtype too (torch's loader would make it float32 where the group is capturable)."""
        kept = (*self.accumulated_state, "step")
        saved = {
            key: {
                name: value for name, value in state.items() if name in kept and isinstance(value, torch.Tensor)
            }
            for key, state in state_dict["state"].items()
        }
        # Saved keys (indices, or names when torch.distributed.checkpoint loads) follow the
        # saved groups' order, which matches this optimizer's, as torch's own loader assumes.
        keys = [key for group in state_dict["param_groups"] for key in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        by_key = dict(zip(keys, params, strict=False))
        super().load_state_dict(state_dict)
        for key, tensors in saved.items():
            p = by_key[key]
            for name, value in tensors.items():
                dtype = value.dtype if name == "step" else ops.accumulation_dtype(p.dtype)
                self.state[p][name] = value.to(device=p.device, dtype=dtype, copy=True)

    @staticmethod
    def zeros_like_table(p: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Zeroed optimizer state for table p in the accumulation dtype, on huge pages where
        the system has them (rows are read at random: see memory_ext.ops.advise_huge_pages)."""
        state = torch.empty(shape, dtype=ops.accumulation_dtype(p.dtype), device=p.device)
        return ops.advise_huge_pages(state).zero_()

    def group_of(self, p: Tensor) -> dict:
        """The param group holding p (ValueError when none does)."""
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError(
            f"{type(self).__name__}: the table of shape {tuple(p.shape)} is not one of this optimizer's parameters"
        )

    # Whether update_rows takes padded rows: the rows, then -1 entries to be skipped, with
    # zero gradients (the fused update in fixed shapes, memory_ext.nn.fused). A subclass
    # that sets it True must skip them (the library's row ops do); left False, a fused
    # table updated by it runs on the sized path.
    takes_padded_rows: bool = False

    def update_rows(self, p: Tensor, group: dict, rows: Tensor, rows_grad: Tensor) -> None:
        """Update rows ``rows`` (int64, unique, ascending) of p with their gradient rows_grad
        (U, dim); where the class sets ``takes_padded_rows``, rows may be followed by -1
        entries (zero gradients) to be skipped."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    grad = coalesced(p.grad)
                    rows, rows_grad = grad.indices()[0], grad.values()
                else:
                    rows, rows_grad = torch.arange(p.shape[0], device=p.device), p.grad
                self.update_rows(p, group, rows, rows_grad.to(p.dtype))
        return loss

"""Lazy AdamW for value tables with sparse gradients, on the library's fused row update."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from memory_ext import ops

__all__ = ["SparseRowAdam", "coalesced"]


def coalesced(grad: Tensor) -> Tensor:
    """grad (sparse COO) with unique, ascending rows, without sorting when it has them already.

    A table read by one layer gets a gradient whose rows are unique and ascending, but
    autograd drops the tensor's coalesced flag when it stores it; checking the order costs
    one pass over the row indices, where coalesce() would sort and copy every row."""
    if grad.sparse_dim() != 1:
        raise ValueError(
            f"sparse row gradients must have one sparse dimension (the rows), got sparse_dim {grad.sparse_dim()}"
        )
    if grad.is_coalesced():
        return grad
    rows = grad._indices()[0]
    if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
        return torch.sparse_coo_tensor(
            grad._indices(), grad._values(), grad.shape, is_coalesced=True, check_invariants=False
        )
    return grad.coalesce()


class SparseRowAdam(torch.optim.Optimizer):
    """AdamW applied only to the rows present in each parameter's (sparse) gradient.

    A step costs in proportion to the rows read, not to the table: the gradient is
    coalesced (layers sharing a pool add theirs by concatenation) and
    ``torch.ops.memory.row_adam_`` updates those rows and their moments in one pass. It is
    torch.optim.AdamW's per-element formula with one difference, that of SparseAdam:
    rows not read in a step keep their moments and parameters unchanged, instead of
    decaying and moving. The bias correction uses the optimizer's global step count.
    A dense gradient is accepted too and treated as every row read (plain AdamW).
    Moments are kept in float32 (float64 for float64 tables), also for bf16 tables.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"SparseRowAdam: invalid lr {lr}, betas {betas}, eps {eps} or weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the moments stay float32 (float64 for float64 tables): torch's
        loader casts every state tensor to its parameter's dtype, which would round a bf16
        table's moments to bf16 and stop the next step."""
        moments = {
            key: {name: value for name, value in state.items() if name in ("exp_avg", "exp_avg_sq")}
            for key, state in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for key, saved in moments.items():
            p = params[key]
            dtype = ops.accumulation_dtype(p.dtype)
            for name, value in saved.items():
                self.state[p][name] = value.to(device=p.device, dtype=dtype, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() != 2:
                    raise ValueError(f"SparseRowAdam: parameters must be 2-D tables, got shape {tuple(p.shape)}")
                grad = p.grad
                if grad.is_sparse:
                    grad = coalesced(grad)
                    rows, rows_grad = grad.indices()[0], grad.values()
                else:
                    rows, rows_grad = torch.arange(p.shape[0], device=p.device), grad
                state = self.state[p]
                if not state:
                    moment_dtype = ops.accumulation_dtype(p.dtype)
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros(p.shape, dtype=moment_dtype, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(p.shape, dtype=moment_dtype, device=p.device)
                state["step"] += 1
                ops.row_adam_(
                    p, state["exp_avg"], state["exp_avg_sq"], rows, rows_grad.to(p.dtype),
                    lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"], step=state["step"],
                )
        return loss

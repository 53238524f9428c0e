"""Lazy AdamW for value tables with sparse gradients, on the library's fused row update."""
from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from memory_ext import ops
from memory_ext.nn.row_optimizer import RowOptimizer
from memory_ext.sparse_rows import coalesced

__all__ = ["SparseRowAdam", "coalesced"]


class SparseRowAdam(RowOptimizer):
    """AdamW applied only to the rows present in each parameter's (sparse) gradient.

    A step costs in proportion to the rows read, not to the table: the gradient is
    coalesced (layers sharing a pool add theirs by concatenation) and
    ``torch.ops.memory.row_adam_`` updates those rows and their moments in one pass. It is
    torch.optim.AdamW's per-element formula with one difference, that of SparseAdam:
    rows not read in a step keep their moments and parameters unchanged, instead of
    decaying and moving. The bias correction uses the optimizer's global step count.
    A dense gradient is accepted too and treated as every row read (plain AdamW).
    Moments are kept in float32 (float64 for float64 tables), also for bf16 tables: two
    per element, so a float32 table's optimizer state is twice its size (see
    SparseRowAdagrad for one float per row).
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

    accumulated_state = ("exp_avg", "exp_avg_sq")

    def update_rows(self, p: Tensor, group: dict, rows: Tensor, rows_grad: Tensor) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = self.zeros_like_table(p, tuple(p.shape))
            state["exp_avg_sq"] = self.zeros_like_table(p, tuple(p.shape))
        state["step"] += 1
        beta1, beta2 = group["betas"]
        ops.row_adam_(
            p, state["exp_avg"], state["exp_avg_sq"], rows, rows_grad,
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], step=state["step"],
        )

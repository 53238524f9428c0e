"""Row-wise Adagrad for value tables: one float of optimizer state per row."""
from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from memory_ext import ops
from memory_ext.nn.row_optimizer import RowOptimizer

__all__ = ["SparseRowAdagrad"]


class SparseRowAdagrad(RowOptimizer):
    """Row-wise Adagrad on the rows present in each parameter's (sparse) gradient.

    Each row r keeps one number, the running sum of its gradient's mean square:
    ``s[r] += mean_j g[r, j]^2``, then ``p[r] -= lr * g[r] / (sqrt(s[r]) + eps)`` (and
    decoupled weight decay ``p[r] *= 1 - lr * weight_decay`` first). The state is a
    (n_rows,) float32 vector (float64 for float64 tables): 4 bytes per row, where
    SparseRowAdam's two moments take 8 bytes per element, twice a float32 table, which is
    what decides whether a table of 10^8+ rows fits. One fused pass of
    ``torch.ops.memory.row_adagrad_`` per step; rows not read are untouched. Adagrad's
    steps shrink as s grows, so it takes a larger lr than Adam (0.01 to 0.1 is typical
    for value tables; tune it).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.05,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or not eps > 0 or weight_decay < 0:
            raise ValueError(f"SparseRowAdagrad: invalid lr {lr}, eps {eps} or weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))

    accumulated_state = ("sum_sq",)
    takes_padded_rows = True  # the row op skips -1 padding

    def update_rows(self, p: Tensor, group: dict, rows: Tensor, rows_grad: Tensor) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["sum_sq"] = self.zeros_like_table(p, (p.shape[0],))
        state["step"] += 1
        ops.row_adagrad_(
            p, state["sum_sq"], rows, rows_grad, lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"]
        )

"""Lazy AdamW for value tables with sparse gradients, on the library's fused row update."""
from __future__ import annotations

from collections.abc import Iterable

import torch
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

    capturable: keep each table's step count in a 0-d int64 tensor on the table's device
    and advance it there (``row_adam_`` given the tensor), so that a step reads
    nothing on the host and can be captured in a CUDA graph, each replay taking the next
    count (as torch.optim.Adam's ``capturable=True``); None (the default): for tables on
    CUDA. Off, the count is a Python int (a captured step would replay the count it was
    captured with). The update is the same (bit for bit on the CPU); saved states load
    either way, the count converted.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        capturable: bool | None = None,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"SparseRowAdam: invalid lr {lr}, betas {betas}, eps {eps} or weight_decay {weight_decay}")
        capturable = None if capturable is None else bool(capturable)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, capturable=capturable))

    accumulated_state = ("exp_avg", "exp_avg_sq")
    takes_padded_rows = True  # the row op skips -1 padding

    def update_rows(self, p: Tensor, group: dict, rows: Tensor, rows_grad: Tensor) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = self.zeros_like_table(p, tuple(p.shape))
            state["exp_avg_sq"] = self.zeros_like_table(p, tuple(p.shape))
        beta1, beta2 = group["betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        capturable = group.get("capturable")  # absent in groups saved before it existed
        if p.is_cuda if capturable is None else capturable:
            step = _count_tensor(state, p)  # advanced by the call, on the device
        else:
            step = state["step"] = _count_int(state) + 1
        ops.row_adam_(p, state["exp_avg"], state["exp_avg_sq"], rows, rows_grad, step=step, **hyper)


def _count_tensor(state: dict, p: Tensor) -> Tensor:
    """The step count as a 0-d int64 tensor on p's device, converted in place where a
    state saved with the count as an int (or on another device) holds it otherwise."""
    count = state["step"]
    if not (isinstance(count, Tensor) and count.dtype == torch.int64 and count.dim() == 0 and count.device == p.device):
        count = torch.tensor(int(count), dtype=torch.int64, device=p.device)
        state["step"] = count
    return count


def _count_int(state: dict) -> int:
    """The step count as an int (a state saved by a capturable optimizer holds a tensor:
    read once, here, on the host)."""
    count = state["step"]
    return int(count.item()) if isinstance(count, Tensor) else int(count)

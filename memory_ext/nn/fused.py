"""Fused update-in-backward: a value table's backward applies its row optimizer to the rows
read and stores no gradient (the idea behind FBGEMM's table-batched embeddings at scale).

The backward of each lookup computes the rows' gradient with the library's sparse kernel
and hands it to the table's FusedRowUpdate, which queues one callback at the end of the
backward pass. The callback adds the gradients of every read of the table in that pass
(a pool shared by several layers), in the order autograd would have accumulated them,
optionally clips them, and calls the optimizer's ``update_rows``. So an update happens
after every backward pass, with the same rows and the same formula as "sparse gradient,
then optimizer.step()"; only the gradient tensor between the two is never kept.

With fixed shapes (``static_shapes``, the default on CUDA) every tensor of that update
has a size known before the step: the lookups' row gradients come padded from
``embedding_bag_backward_padded``, several reads of a pool are merged by one more call of
it, and the row optimizer skips the padding. Nothing then waits for the device, so a
whole training step can be captured in a CUDA graph (SparseRowAdagrad takes no step
count; SparseRowAdam keeps its count on the device for CUDA tables, its ``capturable``
default, so each replay takes the next count). The price of fixed shapes is room for
the worst case: each read's row gradient has min(lookups, n_rows) rows, not the rows
read (with hot rows far fewer), and the merge, the clipping norm and the optimizer's
grid cover that room; ``static_shapes=False`` takes the sized path instead (one host
synchronisation per read, outputs of the rows read). The same rows
get the same update as without; the sums of a pool read several times are taken in
float32 and rounded once (torch's sparse addition rounds each sum to the table's dtype:
the same bits for float32 tables, possibly not for 16-bit ones), and a clipping norm is
summed over the padded rows (zeros, so the same value up to the order of the sum).
"""
from __future__ import annotations

import torch
from torch import Tensor

from memory_ext import ops
from memory_ext.nn.clipping import clip_coefficient, square_norm
from memory_ext.nn.row_optimizer import RowOptimizer, check_row_optimizer
from memory_ext.sparse_rows import coalesced, merged_padded_rows, sparse_rows_grad

__all__ = ["FusedRowUpdate", "fused_lookup"]


class FusedRowUpdate:
    """The link from one table (``weight``) to the RowOptimizer that updates it in its backward.

    max_norm: clip the table's gradient of each backward pass to this L2 norm before the
    update (the paper's separate clipping of the values; per table). ``last_norm`` is
    that gradient's norm before clipping (a 0-d float32 tensor, set when clipping), for
    logging. Gradient accumulation over several backward passes is not possible: each
    pass updates the table. static_shapes: every tensor of the update of a size known
    before the step (see the module's docstring); None: on CUDA tables, where the
    optimizer takes padded rows (SparseRowAdam and SparseRowAdagrad do; a RowOptimizer of
    your own runs sized unless it sets ``takes_padded_rows``).
    """

    def __init__(
        self,
        optimizer: RowOptimizer,
        weight: Tensor,
        max_norm: float | None = None,
        static_shapes: bool | None = None,
    ) -> None:
        check_row_optimizer("fused value update", optimizer, max_norm)
        optimizer.group_of(weight)  # the optimizer must hold the table
        if static_shapes and not optimizer.takes_padded_rows:
            raise ValueError(
                f"fused value update: static_shapes=True needs a row optimizer that skips -1 padding "
                f"(takes_padded_rows), and {type(optimizer).__name__} does not say it does"
            )
        self.optimizer, self.weight, self.max_norm = optimizer, weight, max_norm
        self._static_shapes = None if static_shapes is None else bool(static_shapes)
        self.last_norm: Tensor | None = None
        self._pending: list[Tensor | tuple[Tensor, Tensor]] = []
        self._task: int | None = None

    @property
    def static_shapes(self) -> bool:
        """Whether the update runs in fixed shapes; unset, where the table is now (CUDA) and
        the optimizer takes padded rows (RowOptimizer.takes_padded_rows)."""
        if self._static_shapes is None:
            return self.weight.is_cuda and self.optimizer.takes_padded_rows
        return self._static_shapes

    def arrive(self, rows: Tensor, rows_grad: Tensor) -> None:
        """Called by each lookup's backward: keep its rows' gradient until the pass ends."""
        task = torch._C._current_graph_task_id()
        if task != self._task:
            # The first read of this pass. Anything pending was left by a pass that failed
            # before its end: it never reached its callback and must not leak into this one.
            self._pending, self._task = [], task
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)
        if self.static_shapes:
            self._pending.append((rows, rows_grad))  # padded (-1 rows, zero gradients)
        else:
            self._pending.append(sparse_rows_grad(rows, rows_grad, self.weight.shape))

    @torch.no_grad()
    def _flush(self) -> None:
        pending, self._pending, self._task = self._pending, [], None
        if self.static_shapes:
            rows, rows_grad = merged_padded_rows(self.weight, pending)
            grad = rows_grad
        else:
            grad = pending[0]
            for g in pending[1:]:
                grad = grad + g  # concatenation, as autograd accumulates sparse gradients
            grad = coalesced(grad)
            rows, rows_grad = grad.indices()[0], grad.values()
        if self.max_norm is not None:
            self.last_norm = square_norm([grad]).sqrt()  # as clip_grad_norms computes it
            rows_grad = rows_grad * clip_coefficient(self.last_norm, self.max_norm)
        p = self.weight
        self.optimizer.update_rows(p, self.optimizer.group_of(p), rows, rows_grad.to(p.dtype))


class _FusedBag(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, table: Tensor, indices: Tensor, weights: Tensor, link: FusedRowUpdate, check_indices: bool
    ) -> Tensor:
        ctx.save_for_backward(table, indices, weights)
        ctx.link = link
        return ops.embedding_bag(table, indices, weights, check_indices=check_indices)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        table, indices, weights = ctx.saved_tensors
        need_weights = ctx.needs_input_grad[2]
        # The weights' gradient reads the table: computed here, before any update of the pass.
        backward = ops.embedding_bag_backward_padded if ctx.link.static_shapes else ops.embedding_bag_backward
        rows, rows_grad, weights_grad = backward(grad_out.contiguous(), table, indices, weights, need_weights)[:3]
        ctx.link.arrive(rows, rows_grad)
        return None, None, weights_grad if need_weights else None, None, None


def fused_lookup(
    table: Tensor, indices: Tensor, weights: Tensor, link: FusedRowUpdate, check_indices: bool = True
) -> Tensor:
    """embedding_bag whose backward updates ``table`` through ``link`` instead of writing its gradient.

    Eager only: MemoryValues calls it outside compiled graphs, the update being a side
    effect of the backward."""
    return _FusedBag.apply(table, indices, weights, link, check_indices)

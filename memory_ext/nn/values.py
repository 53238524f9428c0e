"""The value table of a memory layer, shareable by several layers."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from memory_ext import ops
from memory_ext.nn import optimizer_guard
from memory_ext.nn.fused import FusedRowUpdate, fused_lookup
from memory_ext.nn.row_optimizer import RowOptimizer
from memory_ext.sparse_rows import sparse_rows_grad

__all__ = ["MemoryValues"]


class MemoryValues(nn.Module):
    """One value table ``weight`` (n_rows, dim), read as weighted bags of rows.

    Several memory layers share a pool by receiving the same instance: each registers it
    as a submodule, so it moves, casts and trains with the model, and its table appears
    in ``state_dict`` once per sharing layer, every key holding the same tensor (saved
    once by ``torch.save``, and loading writes the same bits to the one table).

    With a ``process_group`` of more than one rank, ``MemoryValues(...)`` builds a
    :class:`memory_ext.distributed.ShardedValues` (a subclass): the table split by columns
    over the group, ``dim`` still the full width. A group of one rank keeps a plain table.

    Three training paths, for the cost of a step at large n_rows:

    - dense (the default): ``weight.grad`` is a dense (n_rows, dim) tensor, which any
      torch optimizer takes; writing it and walking it in AdamW cost O(n_rows * dim) per
      step, whatever was read.
    - sparse (``sparse_grad=True``, or what :func:`memory_ext.nn.value_optimizer` sets):
      ``weight.grad`` is a sparse COO tensor of the rows read only; a RowOptimizer
      (SparseRowAdam, SparseRowAdagrad) steps just those rows.
    - fused (``fuse(optimizer)``, or ``value_optimizer(model, lr, fused=True)``): the
      backward applies the RowOptimizer to the rows read and stores no gradient at all.
      On CUDA tables it runs in fixed shapes (``static_shapes``: padded row gradients, no
      host synchronisation), so a whole step can be captured in a CUDA graph.

    ``sparse_grad`` may be changed between steps. The sparse and fused lookups run eagerly
    under ``torch.compile`` (a graph break around the lookup; the rest of the model compiles).
    """

    def __new__(cls, *args, **kwargs):
        # Only a call of MemoryValues itself picks the class. Copies and unpickling call
        # __new__ without arguments and keep the class of what they copy.
        if cls is MemoryValues and _spans_several_ranks(kwargs.get("process_group")):
            # Imported here, not at the top: memory_ext.distributed builds on this module.
            from memory_ext.distributed.values import ShardedValues

            cls = ShardedValues
        return super().__new__(cls)

    def __init__(
        self,
        n_rows: int,
        dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        process_group=None,
        sparse_grad: bool = False,
    ) -> None:
        super().__init__()
        if n_rows <= 0 or dim <= 0:
            raise ValueError(f"MemoryValues: n_rows and dim must be positive, got {n_rows} and {dim}")
        if _spans_several_ranks(process_group):  # only a subclass gets here: see __new__
            raise ValueError(
                f"{type(self).__name__}: a plain table cannot be split over a process group, got "
                f"{process_group.size()} ranks (a subclass of MemoryValues must subclass ShardedValues to shard)"
            )
        self.n_rows, self.dim, self.process_group = n_rows, dim, process_group
        self.sparse_grad = bool(sparse_grad)
        self.fused: FusedRowUpdate | None = None
        self.weight = nn.Parameter(ops.advise_huge_pages(torch.empty(n_rows, dim, dtype=dtype, device=device)))
        self.reset_parameters()

    @property
    def sharded(self) -> bool:
        """True when the table is split over a process group (a ShardedValues)."""
        return False

    def reset_parameters(self) -> None:
        """Values ~ normal(0, dim^-0.5), so a bag of unit-sum weights starts at unit scale."""
        with torch.no_grad():
            self.weight.normal_(0.0, self.dim**-0.5)

    def forward(self, indices: Tensor, weights: Tensor, *, check_indices: bool = True) -> Tensor:
        """indices: (tokens, bag) int64/int32; weights: (tokens, bag) -> (tokens, dim) table dtype.

        check_indices=False vouches that every index is in [0, n_rows), as a memory layer's
        own top-k over its n_rows = n_keys^2 table is: on CUDA it saves the index check's
        host synchronisation (memory_ext.ops.embedding_bag).
        """
        # The op takes float32 weights or the table's dtype; anything else goes via float32.
        if weights.dtype not in (torch.float32, self.weight.dtype):
            weights = weights.float()
        if (self.sparse_grad or self.fused is not None) and torch.is_grad_enabled() and self.weight.requires_grad:
            return _lookup_off_dense(self, indices, weights, check_indices)
        return ops.embedding_bag(self.weight, indices, weights, check_indices=check_indices)

    def fuse(
        self, optimizer: RowOptimizer, *, max_norm: float | None = None, static_shapes: bool | None = None
    ) -> None:
        """Update this table in its backward with ``optimizer`` (which must hold ``weight``).

        From now on no gradient is stored: at the end of each backward pass that read the
        table, the rows read get ``optimizer``'s update (see memory_ext.nn.fused), their
        gradient clipped to ``max_norm`` first if given. ``optimizer.step()`` then has
        nothing to do for it; its lr, state and state_dict work as usual. Undo with unfuse().
        static_shapes (default: on CUDA tables): the update's tensors have sizes known before
        the step, so nothing waits for the device and a step can be captured in a CUDA graph
        (memory_ext.nn.fused says what that changes).
        """
        if self.sharded:
            raise ValueError(
                f"{type(self).__name__}.fuse: the fused update is not supported for a table sharded over a "
                "process group; use sparse_grad=True with a SparseRowAdam instead"
            )
        self.fused = FusedRowUpdate(optimizer, self.weight, max_norm, static_shapes)
        optimizer_guard.watch(self)

    def unfuse(self) -> None:
        """Back to a stored gradient (sparse or dense, as ``sparse_grad`` says)."""
        self.fused = None

    @classmethod
    def from_file(
        cls, path, *, key: str = "weight", mmap: bool = True, device: torch.device | str | None = None
    ) -> MemoryValues:
        """A table read from a safetensors file; mmap=True maps it (see memory_ext.nn.file_values)."""
        from memory_ext.nn.file_values import _load  # imported here: file_values builds on this module

        return _load(path, key, mmap, device, "MemoryValues.from_file")

    def save_file(self, path, *, key: str = "weight") -> None:
        """Write the (n_rows, dim) table to a safetensors file that from_file maps (memory_ext.nn.save_values)."""
        from memory_ext.nn.file_values import save_values

        save_values(self, path, key=key)

    def extra_repr(self) -> str:
        group = "" if self.process_group is None else f", ranks={self.process_group.size()}"
        path = ", fused" if self.fused is not None else ", sparse_grad=True" if self.sparse_grad else ""
        return f"{self.n_rows}, {self.dim}, dtype={self.weight.dtype}{group}{path}"


def _spans_several_ranks(process_group) -> bool:
    return process_group is not None and process_group.size() > 1


class _SparseGradBag(torch.autograd.Function):
    """embedding_bag whose table gradient is a coalesced sparse COO tensor of the touched rows.

    The same kernels as the dense path (whose embedding_bag_backward_dense places these rows
    in a table, bit for bit). Layers sharing a pool get their sparse gradients summed by
    autograd."""

    @staticmethod
    def forward(ctx, table: Tensor, indices: Tensor, weights: Tensor, check_indices: bool) -> Tensor:
        ctx.save_for_backward(table, indices, weights)
        return ops.embedding_bag(table, indices, weights, check_indices=check_indices)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        table, indices, weights = ctx.saved_tensors
        need_table, _, need_weights, _ = ctx.needs_input_grad
        rows, rows_grad, weights_grad = ops.embedding_bag_backward(
            grad_out.contiguous(), table, indices, weights, need_weights
        )
        grad_table = sparse_rows_grad(rows, rows_grad, table.shape) if need_table else None
        return grad_table, None, weights_grad if need_weights else None, None


def sparse_lookup(table: Tensor, indices: Tensor, weights: Tensor, check_indices: bool = True) -> Tensor:
    """embedding_bag with a sparse COO gradient for ``table``."""
    return _SparseGradBag.apply(table, indices, weights, check_indices)


@torch.compiler.disable
def _lookup_off_dense(module: MemoryValues, indices: Tensor, weights: Tensor, check_indices: bool) -> Tensor:
    """The sparse or fused lookup of a table. Runs eagerly under torch.compile (one graph
    break per lookup): a compiled graph can neither return a sparse gradient nor hold an
    optimizer update inside its backward."""
    optimizer_guard.watch(module)
    if module.fused is not None:
        return fused_lookup(module.weight, indices, weights, module.fused, check_indices)
    return sparse_lookup(module.weight, indices, weights, check_indices)

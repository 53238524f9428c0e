"""ShardedValues: a value table whose columns are split over a memory group."""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from memory_ext import ops
from memory_ext.distributed.layout import SHARD_ATTR, ColumnShard
from memory_ext.distributed.lookup import sharded_lookup
from memory_ext.distributed.table import as_dtensor, local_columns, seeded_normal_columns_
from memory_ext.nn import optimizer_guard
from memory_ext.nn.values import MemoryValues

__all__ = ["ShardedValues"]


def _draw_seed() -> int:
    # From torch's default generator, so ranks seeded alike draw the same seed without a collective.
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


class ShardedValues(MemoryValues):
    """This rank's column slice of an (n_rows, dim) value table shared by a memory group.

    What ``MemoryValues(n_rows, dim, process_group=group)`` builds when the group has
    several ranks; build it directly to set the options below at construction, or to
    shard over a group of one rank (where MemoryValues keeps a plain table). ``dim`` is
    the full width; ``weight`` is (n_rows, size), the columns [start, start + size) that
    ``column_split(dim, group size)`` gives this rank (torch.chunk's rule, as DTensor
    Shard(1)). process_group None: the default group.

    ``memory_shard`` (a ColumnShard) keeps the split and the options ``average_grads``
    and ``timeout``, which may change at any time. ``seed`` fixes the initial table (see
    reset_parameters). ``state_dict()['weight']`` is a DTensor sharded on dim 1 over the
    group; ``load_state_dict`` takes such a DTensor (any mesh or placement) or the full
    plain table. Building the table runs no collective; every lookup is one, on every
    rank of the group (see sharded_lookup). With ``sparse_grad=True`` the slice's gradient
    is a sparse COO tensor of the rows the group read (train it with SparseRowAdam;
    sync_replica_grads averages such gradients too); the fused update is not supported.
    """

    def __init__(
        self,
        n_rows: int,
        dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        process_group: dist.ProcessGroup | None = None,
        sparse_grad: bool = False,
        average_grads: bool = False,
        timeout: timedelta | None = None,
        seed: int | None = None,
    ) -> None:
        if n_rows <= 0 or dim <= 0:
            raise ValueError(f"ShardedValues: n_rows and dim must be positive, got {n_rows} and {dim}")
        # Not MemoryValues.__init__: it allocates and draws the whole table, of which this
        # rank holds a slice.
        nn.Module.__init__(self)
        self.n_rows, self.dim, self.sparse_grad, self.fused = n_rows, dim, bool(sparse_grad), None
        shard = ColumnShard.over_group(process_group, n_rows, dim, average_grads=average_grads, timeout=timeout)
        setattr(self, SHARD_ATTR, shard)
        self.weight = nn.Parameter(ops.advise_huge_pages(torch.empty(n_rows, shard.size, dtype=dtype, device=device)))
        self.reset_parameters(seed)

    @property
    def process_group(self) -> dist.ProcessGroup:
        """The memory group (read from memory_shard, so a deep copy shares it)."""
        return self.memory_shard.group

    @property
    def sharded(self) -> bool:
        """Always True: this table holds a column slice."""
        return True

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Values ~ normal(0, dim^-0.5), column j of the full table drawn from its own seed (seed, j).

        The full table depends on ``seed`` only, never on the group size. seed None: one is
        drawn from torch's default generator, so ranks seeded alike agree. No collective.
        """
        seed = _draw_seed() if seed is None else seed
        seeded_normal_columns_(self.weight, self.memory_shard.start, seed, self.dim**-0.5)

    def forward(self, indices: Tensor, weights: Tensor, *, check_indices: bool = True) -> Tensor:
        """indices: (tokens, bag) int64/int32, weights: (tokens, bag), this rank's tokens -> (tokens, dim).

        A collective over the memory group: see sharded_lookup. The index range is always
        checked, from the metadata the ranks exchange before the lookup (that exchange
        sizes the collectives, so the check costs no synchronisation of its own);
        check_indices is accepted so that every table takes the same call.
        """
        del check_indices
        if self.sparse_grad:
            optimizer_guard.watch(self)
        return sharded_lookup(self, indices, weights)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # The checkpoint form is the whole table as a DTensor, so that
        # torch.distributed.checkpoint can reshard it to any group size.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        if key in destination:
            destination[key] = as_dtensor(self, destination[key])

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Any whole table (DTensor of any split, or plain) becomes this rank's columns first.
        key = prefix + "weight"
        if key in state_dict:
            state_dict[key] = local_columns(self, state_dict[key])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        shard = self.memory_shard
        return (
            f"{self.n_rows}, {self.dim}, dtype={self.weight.dtype}, ranks={shard.group_size}, "
            f"columns=[{shard.start}, {shard.start + shard.size}){', sparse_grad=True' if self.sparse_grad else ''}"
        )

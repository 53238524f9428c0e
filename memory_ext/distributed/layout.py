"""Which columns of a value table each rank of a memory group holds, and the options of a split."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

__all__ = ["column_split", "ColumnShard", "shard_of", "is_sharded"]

# Attribute under which a ShardedValues keeps its ColumnShard. A plain attribute (not a
# buffer), so it never enters state_dict and travels with the module object itself.
SHARD_ATTR = "memory_shard"


def column_split(dim: int, parts: int) -> list[tuple[int, int]]:
    """(start, size) of each part's columns of a width-``dim`` table, in part order.

    The rule is torch.chunk's, which is also DTensor's ``Shard(1)``: every part gets
    ceil(dim / parts) columns except the last ones, which get the rest (possibly none).
    Matching DTensor means a rank's slice is exactly its DTensor local tensor, so
    checkpoints reshard without copies on save. Example: dim 10 over 4 -> 3, 3, 3, 1.
    """
    if dim <= 0 or parts <= 0:
        raise ValueError(f"memory.column_split: dim and parts must be positive, got {dim} and {parts}")
    chunk = -(-dim // parts)
    out = []
    for p in range(parts):
        start = min(dim, chunk * p)
        stop = min(dim, chunk * (p + 1))
        out.append((start, stop - start))
    return out


@dataclass
class ColumnShard:
    """The split of one value table over a memory group, kept on its ShardedValues.

    Options a user may change at any time (identically on every rank of the group):
    ``average_grads`` multiplies this rank's value gradient by 1 / group size (the
    data-parallel mean instead of the sum); ``timeout`` bounds every wait on a collective
    of this table: its lookups and full_table, and sync_replica_grads, sharded_grad_norm and
    clip_grad_norms unless they are given their own (None: the process group's own timeout).
    """

    group: dist.ProcessGroup
    ranks: tuple[int, ...]  # global ranks of the group, in group-rank order
    group_rank: int
    n_rows: int
    dim: int
    columns: tuple[tuple[int, int], ...]  # (start, size) per group rank
    average_grads: bool = False
    timeout: timedelta | None = None
    calls: int = 0  # lookups so far; all ranks must agree (checked on every call)
    _meshes: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def group_size(self) -> int:
        """Number of ranks in the memory group."""
        return len(self.ranks)

    @property
    def start(self) -> int:
        """First column held by this rank."""
        return self.columns[self.group_rank][0]

    @property
    def size(self) -> int:
        """Number of columns held by this rank (may be 0 when dim < group size)."""
        return self.columns[self.group_rank][1]

    @property
    def grad_scale(self) -> float:
        """Factor applied to this rank's value gradient."""
        return 1.0 / self.group_size if self.average_grads else 1.0

    def device_mesh(self, device_type: str):
        """A 1-D DeviceMesh over the group (cached per device type), for DTensors."""
        mesh = self._meshes.get(device_type)
        if mesh is None:
            from torch.distributed.device_mesh import DeviceMesh

            mesh = DeviceMesh.from_group(self.group, device_type)
            self._meshes[device_type] = mesh
        return mesh

    @classmethod
    def over_group(
        cls,
        group: dist.ProcessGroup | None,
        n_rows: int,
        dim: int,
        *,
        average_grads: bool = False,
        timeout: timedelta | None = None,
    ) -> ColumnShard:
        """This rank's split of an (n_rows, dim) table over ``group`` (None: the default group).

        Reads the group's membership only: no collective runs.
        """
        if not dist.is_initialized():
            raise RuntimeError("memory.ShardedValues: torch.distributed is not initialised, got no default group")
        group = group if group is not None else dist.group.WORLD
        group_rank = dist.get_rank(group)
        if group_rank < 0:
            raise ValueError(
                f"memory.ShardedValues: this rank ({dist.get_rank()}) is not a member of process_group, "
                f"got members {dist.get_process_group_ranks(group)}"
            )
        ranks = tuple(dist.get_process_group_ranks(group))
        return cls(
            group=group, ranks=ranks, group_rank=group_rank, n_rows=n_rows, dim=dim,
            columns=tuple(column_split(dim, len(ranks))), average_grads=average_grads, timeout=timeout,
        )

    def __deepcopy__(self, memo):
        # A process group cannot be copied; a copied module shares its group (as DDP and
        # FSDP modules do) but gets its own options and call counter.
        new = copy.copy(self)
        new._meshes = dict(self._meshes)
        return new


def shard_of(module) -> ColumnShard:
    """The ColumnShard of a ShardedValues; a clear error for any other module."""
    shard = getattr(module, SHARD_ATTR, None)
    if not isinstance(shard, ColumnShard):
        raise ValueError(
            f"memory.distributed: {type(module).__name__} is not a column-sharded table "
            "(build one with ShardedValues, or MemoryValues with a process group of several ranks)"
        )
    return shard


def is_sharded(module) -> bool:
    """True when ``module`` holds a column slice of a table (a ShardedValues)."""
    return isinstance(getattr(module, SHARD_ATTR, None), ColumnShard)

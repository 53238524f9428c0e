"""The column-sharded table's split-invariant initialisation, checkpoint form (DTensor) and whole-table views.

Every function takes a ShardedValues (or any module with a ``memory_shard`` and a ``weight``
slice); ShardedValues calls them for its own init and state_dict.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from memory_ext.distributed.comm import _wait, all_gather_fixed
from memory_ext.distributed.layout import shard_of

__all__ = [
    "seeded_normal_columns_",
    "as_dtensor",
    "local_columns",
    "load_full_",
    "full_table",
]


def _mix(seed: int, column: int) -> int:
    # splitmix64 finaliser: well-spread 63-bit seeds for neighbouring columns.
    z = (seed + 0x9E3779B97F4A7C15 * (column + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


@torch.no_grad()
def seeded_normal_columns_(table: Tensor, first_column: int, seed: int, std: float) -> Tensor:
    """Fill table (rows, width) with normal(0, std), column j drawn from its own seed (seed, first_column + j).

    Every column depends only on (seed, its global index), so a table split over any
    number of ranks holds the same full table: the initial model does not depend on
    the memory parallelism.
    """
    gen = torch.Generator(device=table.device)
    column = torch.empty(table.shape[0], dtype=table.dtype, device=table.device)
    for j in range(table.shape[1]):
        gen.manual_seed(_mix(seed, first_column + j))
        table[:, j] = column.normal_(0.0, std, generator=gen)
    return table


def as_dtensor(module: nn.Module, local: Tensor | None = None):
    """The table as a DTensor (n_rows, dim) sharded on dim 1 over the group, sharing local's storage.

    local: (n_rows, size) this rank's slice (default: module.weight, detached).
    """
    from torch.distributed.tensor import DTensor, Shard

    shard = shard_of(module)
    local = (module.weight if local is None else local).detach()
    mesh = shard.device_mesh(local.device.type)
    return DTensor.from_local(
        local, mesh, [Shard(1)], run_check=False,
        shape=torch.Size((shard.n_rows, shard.dim)), stride=(shard.dim, 1),
    )


def local_columns(module: nn.Module, table) -> Tensor:
    """This rank's columns of a whole table: a DTensor (any mesh, any placement) or a plain (n_rows, dim) tensor.

    Returns (n_rows, size). A DTensor sharded exactly like this table costs nothing; any
    other DTensor is assembled with full_tensor(), a collective over its own mesh.
    """
    from torch.distributed.tensor import DTensor, Shard

    shard = shard_of(module)
    want = (shard.n_rows, shard.dim)
    if tuple(table.shape) != want:
        raise ValueError(
            f"memory.load_state_dict: a sharded table loads the whole table {want} (plain or DTensor), "
            f"got shape {tuple(table.shape)}"
        )
    if isinstance(table, DTensor):
        mesh = table.device_mesh
        same_split = (
            mesh.ndim == 1
            and tuple(table.placements) == (Shard(1),)
            and tuple(mesh.mesh.flatten().tolist()) == shard.ranks
        )
        if same_split:
            return table.to_local()
        table = table.full_tensor()
    # contiguous: load_state_dict(assign=True) makes this the parameter itself.
    return table[:, shard.start : shard.start + shard.size].contiguous()


@torch.no_grad()
def load_full_(module: nn.Module, table: Tensor) -> nn.Module:
    """Copy this rank's columns of a whole table (n_rows, dim) (plain or DTensor) into the module."""
    module.weight.copy_(local_columns(module, table))
    return module


@torch.no_grad()
def full_table(module: nn.Module, group_dst: int | None = None) -> Tensor | None:
    """The whole (n_rows, dim) table assembled from the group's slices.

    A collective: every rank of the group calls it. group_dst None: every rank gets
    the table; otherwise only group rank ``group_dst`` does and the others get None.
    """
    shard = shard_of(module)
    local = module.weight.detach()
    widest = max(size for _, size in shard.columns)
    padded = F.pad(local, (0, widest - local.shape[1])).contiguous()
    if group_dst is None:
        blocks = all_gather_fixed(padded, shard.group, shard.timeout, "full_table")
    else:
        me = shard.group_rank == group_dst
        gathered = [torch.empty_like(padded) for _ in shard.ranks] if me else None
        work = dist.gather(padded, gathered, group=shard.group, group_dst=group_dst, async_op=True)
        _wait(work, shard.timeout, "full_table")
        if not me:
            return None
        blocks = torch.stack(gathered)
    return torch.cat([blocks[p, :, :size] for p, (_, size) in enumerate(shard.columns)], dim=1)

"""Memory groups inside a larger data-parallel job, and the value-gradient sync between them.

With W ranks and memory groups of P consecutive ranks, group g holds ranks
[g * P, (g + 1) * P); the table slice of group rank i is replicated on the W / P ranks
{i, i + P, i + 2P, ...}, its "replica group". Everything that is not a sharded table is
an ordinary data-parallel replica over all W ranks (DDP, FSDP), so the sharded
parameters are kept out of DDP and averaged over their replica group instead.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from memory_ext.distributed.comm import _wait
from memory_ext.distributed.layout import is_sharded

__all__ = [
    "new_memory_groups",
    "sharded_parameter_names",
    "exclude_from_ddp",
    "sync_replica_grads",
    "sharded_grad_norm",
]


def new_memory_groups(
    group_size: int, *, timeout: timedelta | None = None, backend: str | None = None
) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(memory group, replica group) of this rank: consecutive blocks of group_size ranks, and the strided rest.

    A collective over the world (every rank calls it, once per layout). With
    group_size == world size the replica group holds this rank alone.
    """
    world = dist.get_world_size()
    if group_size <= 0 or world % group_size:
        raise ValueError(
            f"memory.new_memory_groups: group_size must divide the world size {world}, got {group_size}"
        )
    blocks = [list(range(g * group_size, (g + 1) * group_size)) for g in range(world // group_size)]
    strides = [list(range(i, world, group_size)) for i in range(group_size)]
    memory, _ = dist.new_subgroups_by_enumeration(blocks, timeout=timeout, backend=backend)
    replica, _ = dist.new_subgroups_by_enumeration(strides, timeout=timeout, backend=backend)
    return memory, replica


def _sharded_modules(model: nn.Module):
    return [(name, m) for name, m in model.named_modules(remove_duplicate=True) if is_sharded(m)]


def sharded_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the column-sharded tables' parameters in ``model`` (each shared table once)."""
    names = []
    seen = set()
    for name, module in _sharded_modules(model):
        if id(module.weight) not in seen:
            seen.add(id(module.weight))
            names.append(f"{name}.weight" if name else "weight")
    return names


def exclude_from_ddp(model: nn.Module) -> list[str]:
    """Make DistributedDataParallel(model) skip the sharded tables; returns their names.

    Call before wrapping. Their slices differ across the ranks of a memory group, so DDP
    must neither broadcast nor all-reduce them; use sync_replica_grads instead.
    """
    names = sharded_parameter_names(model)
    # A shared table has one name per sharing layer; list them all, whichever DDP meets first.
    aliases = [
        f"{name}.weight" if name else "weight"
        for name, m in model.named_modules(remove_duplicate=False)
        if is_sharded(m)
    ]
    # DDP reads this attribute of the module it wraps (what its own helper
    # _set_params_and_buffers_to_ignore_for_model sets); keep any names already there.
    present = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = present + [n for n in aliases if n not in present]
    return names


@torch.no_grad()
def sync_replica_grads(
    model: nn.Module, replica_group: dist.ProcessGroup, *, average: bool = True, timeout: timedelta | None = None
) -> None:
    """All-reduce every sharded table's gradient over its replica group (mean when ``average``).

    Call after backward, before the optimizer step, on every rank. With average_grads on
    the memory group and average here, a table gets the mean over all W ranks' losses,
    as DDP gives every other parameter.
    """
    size = dist.get_world_size(replica_group)
    seen = set()
    for _, module in _sharded_modules(model):
        grad = module.weight.grad
        if id(module.weight) in seen or size == 1:
            continue
        seen.add(id(module.weight))
        if grad is None:
            raise ValueError(
                "memory.sync_replica_grads: a sharded table has no gradient on this rank, got grad None "
                "(run backward on every rank first)"
            )
        work = dist.all_reduce(grad, group=replica_group, async_op=True)
        _wait(work, timeout, "sync_replica_grads")
        if average:
            grad.div_(size)


@torch.no_grad()
def sharded_grad_norm(model: nn.Module, *, timeout: timedelta | None = None) -> torch.Tensor:
    """L2 norm of the sharded tables' whole gradients (all columns), the same on every rank of a group.

    A collective over each table's memory group. Use it to clip value gradients: a norm
    of the local slice alone would differ between ranks and clip them differently.
    Returns a float32 scalar on the tables' device (0 when there is no gradient).
    """
    total = None
    seen = set()
    for _, module in _sharded_modules(model):
        if id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        grad = module.weight.grad
        local = torch.zeros((), dtype=torch.float32, device=module.weight.device)
        if grad is not None:
            local = grad.float().pow(2).sum()
        shard = module.memory_shard
        work = dist.all_reduce(local, group=shard.group, async_op=True)
        _wait(work, timeout if timeout is not None else shard.timeout, "sharded_grad_norm")
        total = local if total is None else total + local
    if total is None:
        return torch.zeros(())
    return total.sqrt()

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
from torch import Tensor, nn

from memory_ext.distributed.comm import _wait, all_gather_fixed, all_gather_rows
from memory_ext.distributed.layout import ColumnShard, is_sharded
from memory_ext.sparse_rows import coalesced, sparse_rows_grad

__all__ = [
    "new_memory_groups",
    "sharded_parameter_names",
    "exclude_from_ddp",
    "sync_replica_grads",
    "sharded_grad_square_norm",
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


def _named_tables(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the sharded tables of ``model``, each once however many layers share it."""
    seen, tables = set(), []
    for name, module in model.named_modules(remove_duplicate=True):
        if is_sharded(module) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            tables.append((name, module))
    return tables


def _tables(model: nn.Module) -> list[nn.Module]:
    return [module for _, module in _named_tables(model)]


def _timeout(shard: ColumnShard, timeout: timedelta | None) -> timedelta | None:
    # An explicit timeout wins; otherwise the table's own, as for its lookups.
    return timeout if timeout is not None else shard.timeout


def _all_reduce_sum_(x: Tensor, group: dist.ProcessGroup, timeout: timedelta | None, what: str) -> Tensor:
    work = dist.all_reduce(x, group=group, async_op=True)
    _wait(work, timeout, what)
    return x


def sharded_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the column-sharded tables' parameters in ``model`` (each shared table once)."""
    return [f"{name}.weight" if name else "weight" for name, _ in _named_tables(model)]


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
    as DDP gives every other parameter. timeout None: each table's ``memory_shard.timeout``.

    A sparse gradient (``sparse_grad=True``) becomes the sparse gradient of the union of
    the replicas' rows: each replica's rows are gathered, and every row's gradients
    summed in replica-rank order in float32 (the library's deterministic row-sum
    kernel), so all replicas hold the same bits, whatever the backend.
    """
    size = dist.get_world_size(replica_group)
    if size == 1:
        return
    for table in _tables(model):
        grad = table.weight.grad
        if grad is None:
            raise ValueError(
                "memory.sync_replica_grads: a sharded table has no gradient on this rank, got grad None "
                "(run backward on every rank first)"
            )
        wait = _timeout(table.memory_shard, timeout)
        if grad.is_sparse:
            table.weight.grad = grad = _union_of_replicas(table.weight, coalesced(grad), replica_group, wait)
        else:
            _all_reduce_sum_(grad, replica_group, wait, "sync_replica_grads")
        if average:
            grad.div_(size)


def _union_of_replicas(weight: Tensor, grad: Tensor, group: dist.ProcessGroup, timeout: timedelta | None) -> Tensor:
    """The sum over the replica group of sparse row gradients (coalesced), as a coalesced sparse gradient."""
    rows, values = grad.indices()[0], grad.values()
    count = torch.tensor([rows.numel()], dtype=torch.int64, device=weight.device)
    counts = all_gather_fixed(count, group, timeout, "sync_replica_grads_counts").flatten().tolist()
    all_rows = all_gather_rows(rows, counts, group, timeout, "sync_replica_grads_rows")
    all_values = all_gather_rows(values, counts, group, timeout, "sync_replica_grads_values")
    # Summing each row's gradients is the backward of a bag of one row per gathered entry
    # with weight 1: the row-sum kernel adds them in input order, i.e. replica-rank order.
    ones = torch.ones(all_rows.numel(), 1, dtype=torch.float32, device=weight.device)
    union, summed, _ = torch.ops.memory.embedding_bag_backward(all_values, weight, all_rows.view(-1, 1), ones, False)
    return sparse_rows_grad(union, summed, weight.shape)


def _local_square_norm(table: nn.Module) -> Tensor:
    """Sum of squares of this rank's gradient slice, float32 (0 without a gradient)."""
    grad = table.weight.grad
    if grad is None:
        return torch.zeros((), dtype=torch.float32, device=table.weight.device)
    if grad.is_sparse:
        table.weight.grad = grad = coalesced(grad)  # each row once
        grad = grad.values()
    return torch.linalg.vector_norm(grad, dtype=torch.float32).square()


@torch.no_grad()
def sharded_grad_square_norm(model: nn.Module, *, timeout: timedelta | None = None) -> Tensor:
    """Squared L2 norm of the sharded tables' whole gradients (all columns), the same on every rank of a group.

    A collective over each table's memory group, in module order (every rank of a group
    calls it, a table without a gradient counting 0). timeout None: each table's
    ``memory_shard.timeout``. Returns a float32 scalar on the tables' device (a CPU 0 when
    the model has no sharded table).
    """
    total = torch.zeros((), dtype=torch.float32)
    for table in _tables(model):
        shard = table.memory_shard
        part = _all_reduce_sum_(_local_square_norm(table), shard.group, _timeout(shard, timeout), "sharded_grad_norm")
        total = part + total  # part first: the sum lands on the tables' device
    return total


@torch.no_grad()
def sharded_grad_norm(model: nn.Module, *, timeout: timedelta | None = None) -> Tensor:
    """L2 norm of the sharded tables' whole gradients (all columns), the same on every rank of a group.

    A collective over each table's memory group (see sharded_grad_square_norm). Use it to
    clip value gradients: a norm of the local slice alone would differ between ranks and
    clip them differently; clip_grad_norms does so for the model's value tables.
    """
    return sharded_grad_square_norm(model, timeout=timeout).sqrt()

"""The few collectives the sharded table uses, each a thin wrapper over torch.distributed.

Only all_gather_into_tensor, all_to_all_single, gather and all_reduce are used: NCCL and
Gloo (torch >= 2.1) both implement them for uneven splits. Reductions across ranks are
never done by the backend (no reduce_scatter): partial sums travel by all-to-all and are
added locally in rank order, so results are bitwise reproducible on any backend and
uneven token counts need no padding. Every wait honours an optional timeout, and an
optional counter records the bytes each call moves (for benchmarks and tests).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["CommStats", "count_comm", "all_gather_fixed", "all_gather_rows", "all_to_all_flat"]


@dataclass
class CommStats:
    """Bytes this rank sent to and received from other ranks, per collective name."""

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, sent: int, received: int) -> None:
        """Record one call of collective ``name``."""
        self.sent[name] = self.sent.get(name, 0) + sent
        self.received[name] = self.received.get(name, 0) + received
        self.calls[name] = self.calls.get(name, 0) + 1

    @property
    def total_sent(self) -> int:
        """Bytes sent over all collectives."""
        return sum(self.sent.values())

    @property
    def total_received(self) -> int:
        """Bytes received over all collectives."""
        return sum(self.received.values())


_counters: list[CommStats] = []


@contextmanager
def count_comm() -> Iterator[CommStats]:
    """Count the bytes of every collective of memory_ext.distributed issued inside the block."""
    stats = CommStats()
    _counters.append(stats)
    try:
        yield stats
    finally:
        _counters.remove(stats)


def _record(name: str, sent: int, received: int) -> None:
    for stats in _counters:
        stats.add(name, sent, received)


def _wait(work, timeout: timedelta | None, what: str) -> None:
    if timeout is None:
        work.wait()
        return
    try:
        work.wait(timeout)
    except RuntimeError as err:
        raise RuntimeError(
            f"memory.distributed: {what} did not complete within {timeout} (a rank of the group "
            f"did not join it: ranks must call the sharded table together); got: {err}"
        ) from err


# torch 2.14 renamed all_gather_into_tensor (same semantics); older releases lack the new name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_fixed(x: Tensor, group, timeout: timedelta | None = None, name: str = "all_gather") -> Tensor:
    """Same-shape tensors of every rank stacked: x (*s) -> (P, *s), in group-rank order."""
    x = x.contiguous()
    size = dist.get_world_size(group)
    out = x.new_empty((size, *x.shape))
    # The output is the inputs concatenated along dim 0, so gather (1, *s) blocks.
    work = _all_gather_single(out, x.unsqueeze(0), group=group, async_op=True)
    _wait(work, timeout, name)
    nbytes = x.numel() * x.element_size()
    _record(name, nbytes * (size - 1), nbytes * (size - 1))
    return out


def all_gather_rows(
    x: Tensor, counts: list[int], group, timeout: timedelta | None = None, name: str = "all_gather"
) -> Tensor:
    """Rows of every rank concatenated: x (counts[me], *s) -> (sum(counts), *s), in group-rank order.

    Ranks may hold different numbers of rows: each pads to the largest count, the padded
    blocks are gathered in one collective and the padding is dropped.
    """
    most = max(counts)
    x = x.contiguous()
    if x.shape[0] != most:
        x = torch.cat((x, x.new_zeros((most - x.shape[0], *x.shape[1:]))))
    stacked = all_gather_fixed(x, group, timeout, name)
    if all(c == most for c in counts):
        return stacked.view(-1, *x.shape[1:])
    return torch.cat([stacked[p, :c] for p, c in enumerate(counts)])


def all_to_all_flat(
    send: Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group,
    timeout: timedelta | None = None,
    name: str = "all_to_all",
) -> Tensor:
    """1-D all-to-all: send[block p] goes to rank p; returns the blocks received, in rank order.

    send: (sum(send_splits),); returns (sum(recv_splits),) with the block from rank p of
    length recv_splits[p]. Splits count elements, so every block may have its own width.
    """
    me = dist.get_rank(group)
    recv = send.new_empty((sum(recv_splits),))
    work = dist.all_to_all_single(
        recv, send.contiguous(), recv_splits, send_splits, group=group, async_op=True
    )
    _wait(work, timeout, name)
    item = send.element_size()
    _record(name, (sum(send_splits) - send_splits[me]) * item, (sum(recv_splits) - recv_splits[me]) * item)
    return recv

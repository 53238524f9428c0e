"""Is the memory used? Row-read statistics per memory layer, kept on the device.

Each tracked layer adds its selected indices to an int64 count buffer (index_add_, exact
and deterministic); nothing is copied to the host until :func:`memory_usage` is called.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from memory_ext.nn.product_key import ProductKeyMemory

__all__ = ["track_usage", "usage_from_counts", "memory_usage"]


def track_usage(model: nn.Module, enabled: bool = True) -> None:
    """Start (with zeroed counts) or stop counting row reads in every ProductKeyMemory of model."""
    for layer in model.modules():
        if isinstance(layer, ProductKeyMemory):
            layer.usage = (
                torch.zeros(layer.values.n_rows, dtype=torch.int64, device=layer.keys.device)
                if enabled
                else None
            )


def usage_from_counts(counts: Tensor) -> tuple[Tensor, Tensor]:
    """counts: (n_rows,) reads -> (fraction of rows read at least once, KL(usage || uniform) in nats).

    Both are 0-d float64 tensors on the counts' device; KL is 0 for perfectly even use and
    log(n_rows) when a single row takes every read.
    """
    n_rows = counts.numel()
    total = counts.sum()
    p = counts.double() / total.clamp(min=1)
    read = (counts > 0).double().mean()
    kl = torch.xlogy(p, p).sum() + math.log(n_rows)
    return read, torch.where(total > 0, kl, torch.zeros_like(kl))


def memory_usage(model: nn.Module, reset: bool = True) -> dict[str, dict[str, float]]:
    """{layer name: {"rows_read", "kl_uniform", "reads"}} for every tracked layer; one host sync.

    ``reset`` starts a new window (zeroes the counts) after reading.
    """
    names, stats = [], []
    for name, layer in model.named_modules():
        if isinstance(layer, ProductKeyMemory) and layer.usage is not None:
            read, kl = usage_from_counts(layer.usage)
            names.append(name)
            stats.append(torch.stack([read, kl, layer.usage.sum().double()]))
            if reset:
                layer.usage = torch.zeros_like(layer.usage)
    if not stats:
        return {}
    rows = torch.stack(stats).tolist()
    return {n: {"rows_read": r[0], "kl_uniform": r[1], "reads": int(r[2])} for n, r in zip(names, rows, strict=True)}

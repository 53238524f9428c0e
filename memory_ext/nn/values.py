"""The value table of a memory layer, shareable by several layers."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from memory_ext import ops

__all__ = ["MemoryValues"]


class MemoryValues(nn.Module):
    """One value table ``weight`` (n_rows, dim), read as weighted bags of rows.

    Several memory layers share a pool by receiving the same instance: each registers it
    as a submodule, so it moves, casts and trains with the model, and its table appears
    in ``state_dict`` once per sharing layer, every key holding the same tensor (saved
    once by ``torch.save``, and loading writes the same bits to the one table).

    With a ``process_group`` of more than one rank the table is split by columns over
    the group (``memory_ext.distributed``); ``dim`` stays the full width.
    """

    def __init__(
        self,
        n_rows: int,
        dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        process_group=None,
    ) -> None:
        super().__init__()
        if n_rows <= 0 or dim <= 0:
            raise ValueError(f"MemoryValues: n_rows and dim must be positive, got {n_rows} and {dim}")
        self.n_rows, self.dim, self.process_group = n_rows, dim, process_group
        if self.sharded:
            from memory_ext import distributed

            distributed.init_sharded_values(
                self, n_rows, dim, dtype=dtype, device=device, process_group=process_group
            )
        else:
            self.weight = nn.Parameter(torch.empty(n_rows, dim, dtype=dtype, device=device))
            self.reset_parameters()

    @property
    def sharded(self) -> bool:
        """True when the table is split over a process group of several ranks."""
        return self.process_group is not None and self.process_group.size() > 1

    def reset_parameters(self) -> None:
        """Values ~ normal(0, dim^-0.5), so a bag of unit-sum weights starts at unit scale."""
        with torch.no_grad():
            self.weight.normal_(0.0, self.dim**-0.5)

    def forward(self, indices: Tensor, weights: Tensor) -> Tensor:
        """indices: (tokens, bag) int64/int32; weights: (tokens, bag) -> (tokens, dim) table dtype."""
        if self.sharded:
            from memory_ext import distributed

            return distributed.sharded_lookup(self, indices, weights)
        # The op takes float32 weights or the table's dtype; anything else goes via float32.
        if weights.dtype not in (torch.float32, self.weight.dtype):
            weights = weights.float()
        return ops.embedding_bag(self.weight, indices, weights)

    def extra_repr(self) -> str:
        group = "" if self.process_group is None else f", ranks={self.process_group.size()}"
        return f"{self.n_rows}, {self.dim}, dtype={self.weight.dtype}{group}"

"""Sparse row gradients: a (n_rows, dim) COO tensor with one sparse dimension, the rows read."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["coalesced", "sparse_rows_grad"]


def sparse_rows_grad(rows: Tensor, rows_grad: Tensor, shape: torch.Size | tuple[int, int]) -> Tensor:
    """The COO gradient holding rows_grad[u] at row rows[u]; rows must be unique and ascending.

    No check and no copy: the library's backward kernels give rows in that form."""
    return torch.sparse_coo_tensor(rows.unsqueeze(0), rows_grad, shape, is_coalesced=True, check_invariants=False)


def coalesced(grad: Tensor) -> Tensor:
    """grad (sparse COO) with unique, ascending rows, without sorting when it has them already.

    A table read by one layer gets a gradient whose rows are unique and ascending, but
    autograd drops the tensor's coalesced flag when it stores it; checking the order costs
    one pass over the row indices, where coalesce() would sort and copy every row. Layers
    sharing a pool add their gradients by concatenation; those are coalesced by torch."""
    if grad.sparse_dim() != 1:
        raise ValueError(
            f"sparse row gradients must have one sparse dimension (the rows), got sparse_dim {grad.sparse_dim()}"
        )
    if grad.is_coalesced():
        return grad
    rows = grad._indices()[0]
    if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
        return sparse_rows_grad(rows, grad._values(), grad.shape)
    return grad.coalesce()

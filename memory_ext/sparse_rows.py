"""Sparse row gradients: a (n_rows, dim) COO tensor with one sparse dimension, the rows read."""
from __future__ import annotations

import torch
from torch import Tensor

from memory_ext import ops

__all__ = ["coalesced", "merged_padded_rows", "sparse_rows_grad"]


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


def merged_padded_rows(table: Tensor, parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The sum of padded row gradients of ``table`` (each (rows, rows_grad) as
    embedding_bag_backward_padded gives them), padded the same way, in fixed shapes.

    Several parts are concatenated and merged by one more padded backward over them, as
    bags of one with weight one: each row's parts summed in float32 in the parts' order
    and rounded once to the table's dtype; the padding (-1) adds nothing."""
    if len(parts) == 1:
        return parts[0]
    rows = torch.cat([r for r, _ in parts])
    grads = torch.cat([g for _, g in parts])
    ones = torch.ones((rows.shape[0], 1), dtype=grads.dtype, device=grads.device)
    merged_rows, merged_grad, _, _ = ops.embedding_bag_backward_padded(grads, table, rows.unsqueeze(1), ones, False)
    return merged_rows, merged_grad

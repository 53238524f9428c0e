"""Plain-PyTorch oracles for every op, in float64: the one home of the references used by
the tests and the benchmarks."""
from __future__ import annotations

import torch
from torch import Tensor

from memory_ext.ops import accumulation_dtype

__all__ = [
    "embedding_bag_ref",
    "embedding_bag_backward_ref",
    "embedding_bag_backward_sparse_ref",
    "rows_to_dense_ref",
    "half_scores",
    "pair_scores",
    "pk_topk_bruteforce",
    "pk_topk_reference_path",
    "row_adam_ref",
    "row_adagrad_ref",
]


def embedding_bag_ref(values: Tensor, indices: Tensor, weights: Tensor, *, rounded: bool = True) -> Tensor:
    """(rows, dim), (tokens, bag), (tokens, bag) -> (tokens, dim), summed in float64 and
    returned in values' dtype (``rounded=False``: in float64)."""
    out = (values.double()[indices.long()] * weights.double().unsqueeze(-1)).sum(1)
    return out.to(values.dtype) if rounded else out


def embedding_bag_backward_ref(grad_out: Tensor, values: Tensor, indices: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Dense value gradient (rows, dim) and weight gradient (tokens, bag), in float64.

    grad_out is first rounded to values' dtype, as the kernels do."""
    g = grad_out.to(values.dtype).double()
    idx = indices.long()
    grad_values = torch.zeros(values.shape, dtype=torch.float64, device=values.device)
    contrib = g.unsqueeze(1) * weights.double().unsqueeze(-1)  # (tokens, bag, dim)
    grad_values.index_add_(0, idx.reshape(-1), contrib.reshape(-1, values.shape[1]))
    grad_weights = (values.double()[idx] * g.unsqueeze(1)).sum(-1)
    return grad_values, grad_weights


def embedding_bag_backward_sparse_ref(
    grad_out: Tensor, values: Tensor, indices: Tensor, weights: Tensor, need_weights_grad: bool = True,
    *, rounded: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """The outputs of memory.embedding_bag_backward: rows (U,) int64 ascending, rows_grad
    (U, dim) in values' dtype, weights_grad (tokens, bag) in weights' dtype or (0,);
    ``rounded=False``: the gradients in float64."""
    grad_values, grad_weights = embedding_bag_backward_ref(grad_out, values, indices, weights)
    rows = torch.unique(indices.long())
    rows_grad = grad_values[rows]
    if not need_weights_grad:
        grad_weights = grad_weights.new_empty((0,))
    if rounded:
        rows_grad, grad_weights = rows_grad.to(values.dtype), grad_weights.to(weights.dtype)
    return rows, rows_grad, grad_weights


def rows_to_dense_ref(rows: Tensor, rows_grad: Tensor, n_rows: int) -> Tensor:
    """(n_rows, dim) in rows_grad's dtype: rows_grad[u] at row rows[u], zeros elsewhere."""
    dense = rows_grad.new_zeros((n_rows, rows_grad.shape[1]))
    dense[rows] = rows_grad
    return dense


def half_scores(query: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """(tokens, heads, 2 * half), (heads, 2, n_keys, half) -> two (tokens, heads, n_keys) float64."""
    half = keys.shape[-1]
    q = query.double()
    k = keys.double()
    s1 = torch.einsum("thd,hnd->thn", q[..., :half], k[:, 0])
    s2 = torch.einsum("thd,hnd->thn", q[..., half:], k[:, 1])
    return s1, s2


def pair_scores(query: Tensor, keys: Tensor, indices: Tensor) -> Tensor:
    """Differentiable q1 . K1[i] + q2 . K2[j] of the pairs indices = i * n_keys + j, in
    float32 (float64 for float64 inputs), like the kernel: (tokens, heads, k)."""
    heads, half, n_keys = keys.shape[0], keys.shape[3], keys.shape[2]
    dt = accumulation_dtype(query.dtype)
    i, j = indices // n_keys, indices % n_keys
    h = torch.arange(heads, device=indices.device).view(1, heads, 1).expand_as(indices)
    k1, k2 = keys[h, 0, i].to(dt), keys[h, 1, j].to(dt)
    q = query.to(dt)
    return (q[:, :, None, :half] * k1).sum(-1) + (q[:, :, None, half:] * k2).sum(-1)


def _topk_lowest_index_on_ties(full: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk with a defined order: score descending (NaN first), then index ascending.
    A full stable sort would do the same at ten times the cost."""
    top, top_idx = full.topk(k, dim=-1)
    kth = top[..., -1:]
    # Usual case: no NaN, no tie inside the top k or across its border; topk is exact.
    if not top.isnan().any() and (top[..., 1:] != top[..., :-1]).all() and (full >= kth).sum(-1).eq(k).all():
        return top, top_idx
    is_nan = full.isnan()
    kth_nan = kth.isnan()
    above = ~kth_nan & (is_nan | (full > kth))
    tied = torch.where(kth_nan, is_nan, full == kth)
    need = k - above.sum(-1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(-1) <= need))  # exactly k per row
    # Positions of the chosen entries in index order (rank = running count), then a
    # stable sort of those k by score.
    rank = torch.where(chosen, chosen.cumsum(-1) - 1, k)
    positions = torch.arange(full.shape[-1], device=full.device).expand_as(full)
    picked = torch.full((*full.shape[:-1], k + 1), -1, dtype=torch.long, device=full.device)
    picked.scatter_(-1, rank, positions)  # slot k collects the rest and is dropped
    picked = picked[..., :k]
    scores, order = full.gather(-1, picked).sort(dim=-1, descending=True, stable=True)
    return scores, picked.gather(-1, order)


def pk_topk_bruteforce(query: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k over all n_keys^2 pairs in float64: (scores, indices) of shape (tokens, heads, k),
    scores descending (NaN first, as torch.topk), ties in ascending index order."""
    tokens, heads = query.shape[:2]
    n_keys = keys.shape[2]
    s1, s2 = half_scores(query, keys)
    chunk = max(1, (1 << 24) // max(1, heads * n_keys * n_keys))  # about 128 MiB of pair scores
    scores, indices = [], []
    for t0 in range(0, tokens, chunk):
        full = (s1[t0 : t0 + chunk, :, :, None] + s2[t0 : t0 + chunk, :, None, :]).flatten(2)
        s, i = _topk_lowest_index_on_ties(full, k)
        scores.append(s)
        indices.append(i)
    if not scores:
        return s1.new_empty((tokens, heads, k)), torch.empty((tokens, heads, k), dtype=torch.long, device=s1.device)
    return torch.cat(scores), torch.cat(indices)


def pk_topk_reference_path(query: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The usual implementation (full half-score tensors, three topk calls, a gather)."""
    half = keys.shape[-1]
    n_keys = keys.shape[2]
    s1 = torch.einsum("thd,hnd->thn", query[..., :half].float(), keys[:, 0].float())
    s2 = torch.einsum("thd,hnd->thn", query[..., half:].float(), keys[:, 1].float())
    v1, i1 = s1.topk(k, dim=-1)
    v2, i2 = s2.topk(k, dim=-1)
    cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)
    cand_idx = (i1.unsqueeze(-1) * n_keys + i2.unsqueeze(-2)).flatten(-2)
    scores, pos = cand.topk(k, dim=-1)
    return scores, cand_idx.gather(-1, pos)


def row_adam_ref(
    param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, rows: Tensor, rows_grad: Tensor,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """torch.optim.AdamW's update of rows ``rows`` only, in float64, out of place:
    (param, exp_avg, exp_avg_sq), each (n_rows, dim) float64."""
    p, m, v = param.double().clone(), exp_avg.double().clone(), exp_avg_sq.double().clone()
    g = rows_grad.double()
    r = rows.long()
    m[r] = beta1 * m[r] + (1 - beta1) * g
    v[r] = beta2 * v[r] + (1 - beta2) * g * g
    denom = v[r].sqrt() / (1 - beta2**step) ** 0.5 + eps
    p[r] = p[r] * (1 - lr * weight_decay) - lr / (1 - beta1**step) * m[r] / denom
    return p, m, v


def row_adagrad_ref(
    param: Tensor, sum_sq: Tensor, rows: Tensor, rows_grad: Tensor, lr: float, eps: float, weight_decay: float,
) -> tuple[Tensor, Tensor]:
    """Row-wise Adagrad's update of rows ``rows`` only (unique), in float64, out of place:
    (param (n_rows, dim), sum_sq (n_rows,)), both float64. A row of width 0 is unchanged."""
    p, s = param.double().clone(), sum_sq.double().clone()
    g = rows_grad.double()
    r = rows.long()
    if g.shape[1] == 0:
        return p, s
    s[r] = s[r] + g.square().mean(1)
    p[r] = p[r] * (1 - lr * weight_decay) - lr * g / (s[r].sqrt() + eps).unsqueeze(1)
    return p, s

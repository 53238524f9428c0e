"""Plain-PyTorch oracles for every op (float64), used by the tests and the benchmarks."""
import torch


def embedding_bag_ref(values, indices, weights):
    """(rows, dim), (tokens, bag), (tokens, bag) -> (tokens, dim) in values' dtype."""
    v = values.double()
    out = (v[indices.long()] * weights.double().unsqueeze(-1)).sum(1)
    return out.to(values.dtype)


def embedding_bag_backward_ref(grad_out, values, indices, weights):
    """Dense value gradient (rows, dim) and weight gradient (tokens, bag), in float64."""
    g = grad_out.double()
    idx = indices.long()
    grad_values = torch.zeros(values.shape, dtype=torch.float64, device=values.device)
    contrib = g.unsqueeze(1) * weights.double().unsqueeze(-1)  # (tokens, bag, dim)
    grad_values.index_add_(0, idx.reshape(-1), contrib.reshape(-1, values.shape[1]))
    grad_weights = (values.double()[idx] * g.unsqueeze(1)).sum(-1)
    return grad_values, grad_weights


def half_scores(query, keys):
    """(tokens, heads, 2 * half), (heads, 2, n_keys, half) -> two (tokens, heads, n_keys) float64."""
    half = keys.shape[-1]
    q = query.double()
    k = keys.double()
    s1 = torch.einsum("thd,hnd->thn", q[..., :half], k[:, 0])
    s2 = torch.einsum("thd,hnd->thn", q[..., half:], k[:, 1])
    return s1, s2


def pk_topk_bruteforce(query, keys, k):
    """Top-k over all n_keys^2 pairs, float64: (scores, indices) of shape (tokens, heads, k)."""
    s1, s2 = half_scores(query, keys)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)
    return full.topk(k, dim=-1)


def pk_topk_reference_path(query, keys, k):
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

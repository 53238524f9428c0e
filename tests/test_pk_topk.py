"""pk_topk against a brute-force top-k over all n_keys^2 pairs."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memory_ext
from memory_ext import ops
from memory_ext.reference import half_scores, pk_topk_bruteforce

# Half-scores are float32 dot products: allow their rounding (grows with half width).
SCORE_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def make_inputs(tokens, heads, n_keys, half, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(tokens, heads, 2 * half, generator=g).to(dtype).to(device)
    keys = torch.randn(heads, 2, n_keys, half, generator=g).to(dtype).to(device)
    return query, keys


def check_topk(query, keys, k, scores, indices):
    """Scores equal the brute-force top-k; every index scores what it claims; no repeats."""
    n_keys = keys.shape[2]
    ref_scores, _ = pk_topk_bruteforce(query, keys, k)
    tol = SCORE_TOL[query.dtype] * query.shape[-1] ** 0.5
    torch.testing.assert_close(scores.double(), ref_scores, atol=tol, rtol=tol)
    s1, s2 = half_scores(query, keys)
    i, j = indices // n_keys, indices % n_keys
    claimed = s1.gather(-1, i) + s2.gather(-1, j)
    torch.testing.assert_close(claimed, scores.double(), atol=tol, rtol=tol)
    assert (scores[..., :-1] >= scores[..., 1:]).all(), "scores must be sorted descending"
    assert (indices.sort(-1).values.diff(dim=-1) != 0).all(), "an index repeats"
    assert ((indices >= 0) & (indices < n_keys * n_keys)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "tokens,heads,n_keys,half,k",
    [(1, 1, 1, 1, 1), (7, 1, 5, 3, 5), (33, 4, 100, 16, 32), (20, 2, 64, 48, 7), (9, 3, 37, 8, 1), (5, 2, 300, 8, 256),
     (16, 2, 1024, 8, 32), (40, 4, 256, 16, 8), (24, 2, 128, 16, 16)],
)
def test_matches_bruteforce(device, dtype, tokens, heads, n_keys, half, k):
    query, keys = make_inputs(tokens, heads, n_keys, half, dtype, device)
    scores, indices = ops.pk_topk(query, keys, k)
    expect_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert scores.dtype == expect_dtype and indices.dtype == torch.int64
    assert scores.shape == indices.shape == (tokens, heads, k)
    check_topk(query, keys, k, scores, indices)


def test_empty_tokens(device):
    query, keys = make_inputs(0, 4, 16, 8, torch.float32, device)
    scores, indices = ops.pk_topk(query, keys, 4)
    assert scores.shape == indices.shape == (0, 4, 4)


@pytest.mark.parametrize("shape", ["heavy_tail", "outliers", "bimodal"])
def test_skewed_score_distributions(device, shape):
    # The CPU search guesses its filter bar from each row's mean and spread; rows far from
    # normal must fall back to the exact bar and still give the exact top-k.
    query, keys = make_inputs(64, 2, 256, 8, torch.float32, device, seed=3)
    if shape == "heavy_tail":
        keys = keys**3
    elif shape == "outliers":
        keys[:, :, ::37] *= 50
    else:
        keys[:, :, 128:] += 4 * query[0, :, :8].reshape(2, 1, 1, 8).sign()
    scores, indices = ops.pk_topk(query, keys, 16)
    check_topk(query, keys, 16, scores, indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_ranks_first_like_torch_topk(device, dtype):
    query, keys = make_inputs(3, 2, 64, 8, dtype, device)
    keys[1, 0, 5, 2] = float("nan")  # every pair (5, j) of head 1 scores NaN
    scores, indices = ops.pk_topk(query, keys, 6)
    assert torch.isnan(scores[:, 1]).all()
    assert (indices[:, 1] // 64 == 5).all(), "the NaN pairs come first"
    assert (indices[:, 1].diff(dim=-1) > 0).all(), "NaN ties are broken by lower index"
    check_topk(query[:, :1], keys[:1], 6, scores[:, :1], indices[:, :1])


def test_ties_are_broken_by_lower_index():
    query = torch.ones(2, 1, 4)
    keys = torch.ones(1, 2, 6, 2)  # every pair scores 4
    scores, indices = ops.pk_topk(query, keys, 5)
    assert torch.equal(scores, torch.full((2, 1, 5), 4.0))
    assert torch.equal(indices[0, 0], torch.tensor([0, 1, 2, 3, 4]))


def test_non_contiguous_query(device):
    query, keys = make_inputs(12, 2, 40, 8, torch.float32, device)
    wide = torch.randn(12, 2, 40, device=device)
    wide[..., :16] = query
    q = wide[..., :16]
    assert not q.is_contiguous()
    scores, indices = ops.pk_topk(q, keys, 6)
    check_topk(query, keys, 6, scores, indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(device, dtype):
    query, keys = make_inputs(17, 3, 50, 12, dtype, device)
    query.requires_grad_(True)
    keys.requires_grad_(True)
    scores, indices = memory_ext.pk_topk(query, keys, 9)
    grad = torch.randn_like(scores)
    scores.backward(grad)
    q = query.detach().double().requires_grad_(True)
    kk = keys.detach().double().requires_grad_(True)
    s1, s2 = half_scores(q, kk)
    n_keys = keys.shape[2]
    ref = s1.gather(-1, indices // n_keys) + s2.gather(-1, indices % n_keys)
    ref.backward(grad.double())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(query.grad.double(), q.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(keys.grad.double(), kk.grad, atol=tol, rtol=tol)


def test_forward_and_backward_are_deterministic_across_threads():
    query, keys = make_inputs(600, 4, 256, 32, torch.float32, "cpu")
    query.requires_grad_(True)
    keys.requires_grad_(True)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            scores, indices = memory_ext.pk_topk(query, keys, 16)
            gq, gk = torch.autograd.grad(scores.sum(), (query, keys))
            results.append((scores, indices, gq, gk))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@settings(max_examples=30, deadline=None)
@given(
    tokens=st.integers(0, 12),
    heads=st.integers(1, 4),
    n_keys=st.integers(1, 70),
    half=st.integers(1, 20),
    k_frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_bruteforce(tokens, heads, n_keys, half, k_frac, dtype, seed):
    k = max(1, min(n_keys, round(k_frac * n_keys)))
    query, keys = make_inputs(tokens, heads, n_keys, half, dtype, "cpu", seed)
    scores, indices = ops.pk_topk(query, keys, k)
    check_topk(query, keys, k, scores, indices)

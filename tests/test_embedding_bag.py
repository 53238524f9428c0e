"""embedding_bag, embedding_bag_backward and rows_to_dense against plain-PyTorch oracles."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memory_ext
from memory_ext import ops
from memory_ext.reference import embedding_bag_backward_ref, embedding_bag_ref
from conftest import TOL

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(rows, dim, tokens, bag, dtype, device, index_dtype=torch.int64, weight_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, dim, generator=g).to(dtype)
    indices = torch.randint(0, rows, (tokens, bag), generator=g).to(index_dtype)
    weights = torch.rand(tokens, bag, generator=g).to(weight_dtype or torch.float32)
    return values.to(device), indices.to(device), weights.to(device)


def sparse_to_dense_ref(rows, rows_grad, n_rows):
    dense = torch.zeros(n_rows, rows_grad.shape[1], dtype=torch.float64, device=rows.device)
    dense[rows] = rows_grad.double()
    return dense


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 3, 96, 1000])
@pytest.mark.parametrize("bag", [1, 5, 128])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_forward_matches_reference(device, dtype, dim, bag, index_dtype):
    values, indices, weights = make_inputs(300, dim, 37, bag, dtype, device, index_dtype)
    out = ops.embedding_bag(values, indices, weights)
    assert out.dtype == dtype and out.shape == (37, dim)
    torch.testing.assert_close(out, embedding_bag_ref(values, indices, weights), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_in_values_dtype(device, dtype):
    values, indices, weights = make_inputs(64, 24, 9, 6, dtype, device, weight_dtype=dtype)
    out = ops.embedding_bag(values, indices, weights)
    torch.testing.assert_close(out, embedding_bag_ref(values, indices, weights), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("dim,bag,rows", [(1, 1, 5), (3, 7, 11), (96, 128, 300), (1000, 16, 50), (33, 4000, 3)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_backward_matches_reference(device, dtype, dim, bag, rows, index_dtype):
    # (33, 4000, 3): 12000 lookups on 3 rows, runs longer than one backward segment.
    tokens = 3 if bag == 4000 else 29
    weight_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    values, indices, weights = make_inputs(rows, dim, tokens, bag, dtype, device, index_dtype, weight_dtype)
    grad_out = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    rows_t, rows_grad, weights_grad = ops.embedding_bag_backward(grad_out, values, indices, weights)
    ref_gv, ref_gw = embedding_bag_backward_ref(grad_out, values, indices, weights)
    expect_rows = torch.unique(indices.long())
    assert torch.equal(rows_t, expect_rows)
    assert rows_grad.dtype == dtype and weights_grad.dtype == weights.dtype
    tol = dict(TOL[dtype])
    if dtype != torch.float64:  # long sums: scale the tolerance with the summed magnitude
        tol["atol"] *= max(1.0, (tokens * bag / max(rows, 1)) ** 0.5)
    torch.testing.assert_close(rows_grad.double(), ref_gv[expect_rows], **tol)
    torch.testing.assert_close(weights_grad.double(), ref_gw, **tol)
    dense = ops.rows_to_dense(rows_t, rows_grad, rows)
    assert torch.equal(dense.double(), sparse_to_dense_ref(rows_t, rows_grad, rows))


def test_backward_without_weights_grad(device):
    values, indices, weights = make_inputs(50, 8, 10, 4, torch.float32, device)
    grad_out = torch.randn(10, 8, device=device)
    rows, rows_grad, weights_grad = ops.embedding_bag_backward(grad_out, values, indices, weights, False)
    assert weights_grad.shape == (0,)
    full = ops.embedding_bag_backward(grad_out, values, indices, weights, True)
    assert torch.equal(rows, full[0]) and torch.equal(rows_grad, full[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_matches_reference(device, dtype):
    values, indices, weights = make_inputs(200, 40, 23, 9, dtype, device)
    values.requires_grad_(True)
    weights.requires_grad_(True)
    grad_out = torch.randn(23, 40, device=device).to(dtype)
    memory_ext.embedding_bag(values, indices, weights).backward(grad_out)
    ref_gv, ref_gw = embedding_bag_backward_ref(grad_out, values.detach(), indices, weights.detach())
    torch.testing.assert_close(values.grad.double(), ref_gv, **TOL[dtype])
    torch.testing.assert_close(weights.grad.double(), ref_gw, **TOL[dtype])


def test_index_patterns(device):
    """All-equal indices (one run), all-distinct indices, and one hot row among random ones."""
    rows, dim, tokens, bag = 4096, 17, 64, 32
    g = torch.Generator().manual_seed(3)
    patterns = {
        "all_equal": torch.full((tokens, bag), 7),
        "all_distinct": torch.randperm(rows, generator=g)[: tokens * bag].view(tokens, bag),
        "hot_row": torch.where(torch.rand(tokens, bag, generator=g) < 0.5, 11, torch.randint(0, rows, (tokens, bag), generator=g)),
    }
    values = torch.randn(rows, dim, generator=g).to(device)
    weights = torch.randn(tokens, bag, generator=g).to(device)
    grad_out = torch.randn(tokens, dim, generator=g).to(device)
    for name, idx in patterns.items():
        idx = idx.to(device)
        torch.testing.assert_close(ops.embedding_bag(values, idx, weights), embedding_bag_ref(values, idx, weights), **TOL[torch.float32], msg=name)
        r, rg, wg = ops.embedding_bag_backward(grad_out, values, idx, weights)
        ref_gv, ref_gw = embedding_bag_backward_ref(grad_out, values, idx, weights)
        assert torch.equal(r, torch.unique(idx)), name
        torch.testing.assert_close(rg.double(), ref_gv[r], atol=1e-3, rtol=1e-4, msg=name)
        torch.testing.assert_close(wg.double(), ref_gw, **TOL[torch.float32], msg=name)


def test_empty_batches(device):
    values = torch.randn(10, 4, device=device)
    for tokens, bag in [(0, 5), (3, 0), (0, 0)]:
        idx = torch.zeros(tokens, bag, dtype=torch.int64, device=device)
        w = torch.zeros(tokens, bag, device=device)
        out = ops.embedding_bag(values, idx, w)
        assert out.shape == (tokens, 4)
        assert torch.equal(out, torch.zeros_like(out))
        rows, rows_grad, wg = ops.embedding_bag_backward(torch.zeros(tokens, 4, device=device), values, idx, w)
        assert rows.shape == (0,) and rows_grad.shape == (0, 4) and wg.shape == (tokens, bag)
    assert ops.rows_to_dense(rows, rows_grad, 10).abs().sum() == 0


def test_non_contiguous_inputs(device):
    values, indices, weights = make_inputs(100, 64, 20, 8, torch.float32, device)
    v = values[:, ::2]
    idx = indices.t().contiguous().t()
    w = weights.t().contiguous().t()
    assert not v.is_contiguous() and not idx.is_contiguous()
    torch.testing.assert_close(ops.embedding_bag(v, idx, w), embedding_bag_ref(v, idx, w), **TOL[torch.float32])


def test_backward_is_deterministic_across_runs_and_threads():
    values, indices, weights = make_inputs(1000, 96, 300, 64, torch.float32, "cpu")
    indices[:, :20] = 5  # one long run plus many short ones
    grad_out = torch.randn(300, 96)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            results.append(ops.embedding_bag_backward(grad_out, values, indices, weights))
            results.append((ops.embedding_bag(values, indices, weights),))
    finally:
        torch.set_num_threads(threads)
    for other in results[2:]:
        ref = results[0] if len(other) == 3 else results[1]
        assert all(torch.equal(a, b) for a, b in zip(ref, other))


def test_rows_to_dense_rejects_bad_rows():
    grad = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="memory.rows_to_dense: rows must be strictly ascending"):
        ops.rows_to_dense(torch.tensor([3, 1]), grad, 5)
    with pytest.raises(RuntimeError, match="memory.rows_to_dense: rows\\[1\\] = 9 is out of range"):
        ops.rows_to_dense(torch.tensor([1, 9]), grad, 5)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 300),
    dim=st.integers(1, 70),
    tokens=st.integers(0, 40),
    bag=st.integers(1, 50),
    dtype=st.sampled_from(DTYPES),
    pattern=st.sampled_from(["random", "all_equal", "distinct", "hot"]),
    seed=st.integers(0, 2**16),
)
def test_property_forward_backward(rows, dim, tokens, bag, dtype, pattern, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, dim, generator=g).to(dtype)
    if pattern == "all_equal":
        indices = torch.full((tokens, bag), int(torch.randint(0, rows, (1,), generator=g)))
    elif pattern == "distinct":
        indices = torch.randperm(max(rows, tokens * bag), generator=g)[: tokens * bag].remainder(rows).view(tokens, bag)
    elif pattern == "hot":
        indices = torch.where(torch.rand(tokens, bag, generator=g) < 0.7, 0, torch.randint(0, rows, (tokens, bag), generator=g))
    else:
        indices = torch.randint(0, rows, (tokens, bag), generator=g)
    weights = torch.randn(tokens, bag, generator=g)
    grad_out = torch.randn(tokens, dim, generator=g).to(dtype)
    torch.testing.assert_close(ops.embedding_bag(values, indices, weights), embedding_bag_ref(values, indices, weights), **TOL[dtype])
    r, rg, wg = ops.embedding_bag_backward(grad_out, values, indices, weights)
    ref_gv, ref_gw = embedding_bag_backward_ref(grad_out, values, indices, weights)
    assert torch.equal(r, torch.unique(indices))
    scale = max(1.0, (tokens * bag) ** 0.5 / 4)
    tol = {k: v * scale for k, v in TOL[dtype].items()}
    torch.testing.assert_close(rg.double(), ref_gv[r], **tol)
    torch.testing.assert_close(wg.double(), ref_gw, **tol)

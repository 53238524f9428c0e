"""CPU embedding_bag_backward at a realistic size, exact.

Values, weights and output gradients are dyadic (nonzero integers times a power of two,
exact in every dtype), so every product and every float32 partial sum is exact whatever
the summation order: the kernel's rows_grad and weights_grad must equal the float64
reference rounded once to the output dtype, bit for bit; so must embedding_bag_backward_dense,
which writes those rows straight into the table gradient and zeros the others.

Sizes are past every internal boundary of csrc/cpu/embedding_bag.cpp and sort_by_row.h:
128 000 lookups (four sort chunks of 2^15), 5000 rows (a two-pass radix sort; a test with
2^22 + 5 rows takes three passes), and hot rows hit 2048 (one full segment), 2049, 4096
(two) and 5000 times (three segments of 2048 positions folded in order), their lookups
spread over all the chunks. Also: bitwise equal results with 1 and 2 threads on
non-dyadic data, where the summation order shows.
"""
from __future__ import annotations

import functools

import pytest
import torch

from memory_ext import ops
from memory_ext.reference import embedding_bag_backward_ref, embedding_bag_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float64: torch.int64}

ROWS, DIM, TOKENS, BAG = 5000, 35, 1000, 128
# Hot rows and their hit counts: exactly one segment, one past it, two, and three segments.
HOT = {1234: 2048, 2048: 2049, 0: 4096, ROWS - 1: 5000}


def nonzero_dyadic(shape, r, exp, gen):
    """Integers in [-r, r] except 0, times 2^-exp, float64: no product is a signed zero."""
    ints = torch.randint(1, r + 1, shape, generator=gen, dtype=torch.int64)
    signs = torch.randint(0, 2, shape, generator=gen, dtype=torch.int64) * 2 - 1
    return (ints * signs).double() * 2.0**-exp


def hot_indices(rows, tokens, bag, hot, gen):
    """(tokens, bag) uniform indices, with each hot row at exactly its count of random
    positions (spread over every sort chunk) and nowhere else."""
    n = tokens * bag
    is_cold = torch.ones(rows, dtype=torch.bool)
    is_cold[list(hot)] = False
    cold = is_cold.nonzero().squeeze(1)
    idx = cold[torch.randint(0, cold.numel(), (n,), generator=gen)]
    pos = torch.randperm(n, generator=gen)
    start = 0
    for row, count in hot.items():
        idx[pos[start : start + count]] = row
        start += count
    return idx.view(tokens, bag)


def bits_equal(a, b):
    """Bitwise equality of two tensors of one float dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    return torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


@functools.lru_cache(maxsize=4)
def exact_case(seed=0, rows=ROWS, dim=DIM, tokens=TOKENS, bag=BAG, hot=None):
    """float64 inputs (exact in every dtype) and their float64 reference gradients, built
    once per module: the same numbers serve every dtype."""
    g = torch.Generator().manual_seed(seed)
    values = nonzero_dyadic((rows, dim), 8, 3, g)
    indices = hot_indices(rows, tokens, bag, HOT if hot is None else dict(hot), g)
    weights = nonzero_dyadic((tokens, bag), 4, 2, g)
    grad_out = nonzero_dyadic((tokens, dim), 8, 3, g)
    ref_gv, ref_gw = embedding_bag_backward_ref(grad_out, values, indices, weights)
    counts = torch.bincount(indices.flatten(), minlength=rows)
    touched = counts.nonzero().squeeze(1)
    return grad_out, values, indices, weights, ref_gv[touched], ref_gw, touched, counts


def make_case(dtype, index_dtype, weight_dtype, **kw):
    grad_out, values, indices, weights, *ref = exact_case(**kw)
    # Copies: the cached tensors must not pick up requires_grad or anything else.
    inputs = (grad_out.to(dtype, copy=True), values.to(dtype, copy=True), indices.to(index_dtype, copy=True),
              weights.to(weight_dtype, copy=True))
    return inputs, ref


def check_exact(case, ref, need_weights_grad):
    grad_out, values, indices, weights = case
    ref_gv, ref_gw, want_rows, counts = ref
    rows, rows_grad, weights_grad = ops.embedding_bag_backward(grad_out, values, indices, weights, need_weights_grad)
    assert torch.equal(rows, want_rows)
    assert rows_grad.dtype == values.dtype and rows_grad.shape == (want_rows.numel(), values.shape[1])
    want = ref_gv.to(values.dtype)
    if not bits_equal(rows_grad, want):
        bad = (rows_grad.double() != want.double()).any(-1)
        raise AssertionError(
            f"rows_grad differs at {int(bad.sum())} rows, e.g. rows {want_rows[bad][:5].tolist()} "
            f"hit {counts[want_rows[bad][:5]].tolist()} times"
        )
    if need_weights_grad:
        assert weights_grad.dtype == weights.dtype and weights_grad.shape == weights.shape
        assert bits_equal(weights_grad, ref_gw.to(weights.dtype)), "weights_grad differs"
    else:
        assert weights_grad.shape == (0,)
    check_dense_exact(case, ref, need_weights_grad)
    return rows, rows_grad


def check_dense_exact(case, ref, need_weights_grad):
    grad_out, values, indices, weights = case
    ref_gv, ref_gw, want_rows, _ = ref
    dense, weights_grad = ops.embedding_bag_backward_dense(grad_out, values, indices, weights, need_weights_grad)
    want = torch.zeros(values.shape, dtype=torch.float64)
    want[want_rows] = ref_gv
    assert bits_equal(dense, want.to(values.dtype)), "embedding_bag_backward_dense differs"
    if need_weights_grad:
        assert bits_equal(weights_grad, ref_gw.to(weights.dtype)), "its weights_grad differs"


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_exact_at_size(dtype, index_dtype):
    # int64 indices with float32 weights, int32 indices with weights in the values' dtype.
    weight_dtype = torch.float32 if index_dtype == torch.int64 else dtype
    case, ref = make_case(dtype, index_dtype, weight_dtype)
    counts = ref[3]
    assert case[2].numel() >= 100_000 and case[1].shape[0] >= 4096 and counts.max().item() > 2 * 2048
    for row, count in HOT.items():
        assert counts[row].item() == count
    rows, rows_grad = check_exact(case, ref, True)
    # Without the weight gradient: the same rows_grad, bit for bit.
    rows_no_wg, rows_grad_no_wg = check_exact(case, ref, False)
    assert torch.equal(rows_no_wg, rows) and bits_equal(rows_grad_no_wg, rows_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_exact_three_radix_passes(dtype):
    """2^22 + 5 rows: 23 row bits, sorted in three passes; hot rows at both ends."""
    rows = (1 << 22) + 5
    hot = ((rows - 1, 4500), (0, 2100), (1 << 22, 3000), (12345, 1))
    case, ref = make_case(dtype, torch.int64, torch.float32, seed=3, rows=rows, dim=2, tokens=800, bag=128, hot=hot)
    check_exact(case, ref, True)


def test_backward_exact_single_hot_row():
    """Every lookup on one row: a single run of 128 000 positions, 63 segments."""
    g = torch.Generator().manual_seed(4)
    values = nonzero_dyadic((64, DIM), 8, 3, g).float()
    indices = torch.full((TOKENS, BAG), 17, dtype=torch.int64)
    weights = nonzero_dyadic((TOKENS, BAG), 2, 1, g).float()
    grad_out = nonzero_dyadic((TOKENS, DIM), 8, 3, g).float()
    ref_gv, ref_gw = embedding_bag_backward_ref(grad_out, values, indices, weights)
    rows = torch.tensor([17])
    counts = torch.bincount(indices.flatten(), minlength=64)
    check_exact((grad_out, values, indices, weights), (ref_gv[rows], ref_gw, rows, counts), True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autograd_exact_at_size(dtype):
    """Through autograd (embedding_bag's backward and rows_to_dense): dense gradients."""
    (grad_out, values, indices, weights), (ref_gv, ref_gw, touched, _) = make_case(dtype, torch.int64, torch.float32)
    values.requires_grad_(True)
    weights.requires_grad_(True)
    out = ops.embedding_bag(values, indices, weights)
    assert bits_equal(out, embedding_bag_ref(values.detach(), indices, weights.detach()))
    out.backward(grad_out)
    dense = torch.zeros(values.shape, dtype=torch.float64)
    dense[touched] = ref_gv
    assert bits_equal(values.grad, dense.to(dtype))
    assert bits_equal(weights.grad, ref_gw.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_bitwise_across_threads(dtype):
    """Gaussian data, so every summation order gives other bits: 1 and 2 threads agree."""
    g = torch.Generator().manual_seed(6)
    indices = exact_case()[2]
    values = torch.randn(ROWS, DIM, generator=g).to(dtype)
    weights = torch.rand(TOKENS, BAG, generator=g)
    grad_out = torch.randn(TOKENS, DIM, generator=g).to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            results.append(ops.embedding_bag_backward(grad_out, values, indices, weights, True))
            results[-1] += ops.embedding_bag_backward_dense(grad_out, values, indices, weights, True)
    finally:
        torch.set_num_threads(threads)
    first = results[0]
    # The dense form holds the sparse one's rows, bit for bit, and zeros elsewhere.
    assert bits_equal(first[3], ops.rows_to_dense(first[0], first[1], ROWS)) and bits_equal(first[4], first[2])
    for other in results[1:]:
        assert torch.equal(other[0], first[0])
        assert all(bits_equal(a, b) for a, b in zip(other[1:], first[1:], strict=True))


# Rows that outnumber the lookups, at a dim of whole 64-byte lines in every dtype: most runs
# are one or two lookups, which the kernel finishes eight runs at a time (ShortRuns in
# csrc/cpu/embedding_bag.cpp); the other runs, and a task's last few, one at a time.
SPARSE_ROWS, SPARSE_DIM, SPARSE_TOKENS, SPARSE_BAG = 1 << 15, 64, 600, 32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_exact_short_runs(dtype):
    case, ref = make_case(dtype, torch.int64, torch.float32, seed=7, rows=SPARSE_ROWS, dim=SPARSE_DIM,
                          tokens=SPARSE_TOKENS, bag=SPARSE_BAG, hot=((5, 3), (9, 4), (11, 2049)))
    counts = ref[3]
    hit = counts[counts > 0]
    assert (hit == 1).sum() > 8000 and (hit == 2).sum() > 1000 and (hit == 3).sum() > 50
    check_exact(case, ref, True)
    check_exact(case, ref, False)


def run_alone(grad_out, values, indices, weights, row, dense):
    """The backward of row's lookups alone, in their order: a call of one run, which the
    kernel finishes on its own."""
    where = (indices.flatten() == row).nonzero().squeeze(1)
    bag = indices.shape[1]
    tokens = where // bag
    alone = (grad_out[tokens], values, torch.full((where.numel(), 1), row), weights.flatten()[where][:, None])
    if dense:
        table_grad, weights_grad = ops.embedding_bag_backward_dense(*alone, True)
        return table_grad[row], weights_grad.flatten(), where
    rows, rows_grad, weights_grad = ops.embedding_bag_backward(*alone, True)
    assert rows.tolist() == [row]
    return rows_grad[0], weights_grad.flatten(), where


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_short_runs_in_batches_equal_one_at_a_time(dtype, dense):
    """Gaussian data, where the order and fusing of every operation shows: each run of one,
    two and three lookups gets the same bits in the full call (batched) as alone."""
    g = torch.Generator().manual_seed(8)
    values = torch.randn(SPARSE_ROWS, SPARSE_DIM, generator=g).to(dtype)
    indices = torch.randint(0, SPARSE_ROWS, (SPARSE_TOKENS, SPARSE_BAG), generator=g)
    weights = torch.rand(SPARSE_TOKENS, SPARSE_BAG, generator=g)
    grad_out = torch.randn(SPARSE_TOKENS, SPARSE_DIM, generator=g).to(dtype)
    if dense:
        table_grad, weights_grad = ops.embedding_bag_backward_dense(grad_out, values, indices, weights, True)
    else:
        rows, rows_grad, weights_grad = ops.embedding_bag_backward(grad_out, values, indices, weights, True)
        table_grad = torch.zeros(SPARSE_ROWS, SPARSE_DIM, dtype=dtype)
        table_grad[rows] = rows_grad
    counts = torch.bincount(indices.flatten(), minlength=SPARSE_ROWS)
    for length in (1, 2, 3):
        for row in (counts == length).nonzero().squeeze(1)[:: 97][:12].tolist():
            row_grad, lookup_grads, where = run_alone(grad_out, values, indices, weights, row, dense)
            assert bits_equal(table_grad[row], row_grad), (length, row)
            assert bits_equal(weights_grad.flatten()[where], lookup_grads), (length, row)

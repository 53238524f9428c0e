"""embedding_bag, embedding_bag_backward and rows_to_dense against plain-PyTorch oracles.

Gaussian inputs are compared with the float64 reference within memory_ext.testing's
tolerance (one rounding to the output dtype plus a float32 accumulation error that grows
with the number of terms); dyadic inputs make every float32 sum exact, so the kernels must
equal the rounded reference bit for bit.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memory_ext
from memory_ext import ops
from memory_ext.reference import (
    embedding_bag_backward_ref,
    embedding_bag_backward_sparse_ref,
    embedding_bag_ref,
    rows_to_dense_ref,
)
from memory_ext.testing import BACKWARD_SEGMENT, TOL, sample_inputs, tolerance

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bag_inputs(device, dtype, *, seed=0, **shape):
    """(values, indices, weights) of sample_inputs("embedding_bag", ...)."""
    s = sample_inputs("embedding_bag", device, dtype, seed=seed, **shape)
    return s["values"], s["indices"], s["weights"]


def backward_inputs(device, dtype, *, seed=0, **shape):
    """(grad_out, values, indices, weights) of sample_inputs("embedding_bag_backward", ...)."""
    s = sample_inputs("embedding_bag_backward", device, dtype, seed=seed, **shape)
    return s["grad_out"], s["values"], s["indices"], s["weights"]


def longest_run(indices):
    return int(torch.bincount(indices.reshape(-1).long()).max()) if indices.numel() else 1


def check_forward(values, indices, weights, msg=None):
    out = ops.embedding_bag(values, indices, weights)
    assert out.dtype == values.dtype and out.shape == (indices.shape[0], values.shape[1])
    ref = embedding_bag_ref(values, indices, weights, rounded=False)
    tol = tolerance(values.dtype, terms=indices.shape[1])
    torch.testing.assert_close(out.double(), ref, **tol, msg=msg)
    return out


def check_backward(grad_out, values, indices, weights, need_weights_grad=True, msg=None):
    """rows exact; rows_grad within the tolerance of a sum over the longest run; the
    weight gradient within that of a sum over dim, in the weights' dtype."""
    rows, rows_grad, weights_grad = ops.embedding_bag_backward(grad_out, values, indices, weights, need_weights_grad)
    ref_rows, ref_rg, ref_wg = embedding_bag_backward_sparse_ref(grad_out, values, indices, weights, need_weights_grad,
                                                                 rounded=False)
    assert torch.equal(rows, ref_rows), msg
    assert rows_grad.dtype == values.dtype and weights_grad.dtype == weights.dtype
    torch.testing.assert_close(rows_grad.double(), ref_rg, **tolerance(values.dtype, terms=longest_run(indices)), msg=msg)
    if need_weights_grad:
        torch.testing.assert_close(weights_grad.double(), ref_wg, **tolerance(weights.dtype, terms=values.shape[1]),
                                   msg=msg)
    else:
        assert weights_grad.shape == (0,)
    return rows, rows_grad, weights_grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 3, 16, 64, 96, 128, 256, 512, 1000])
@pytest.mark.parametrize("bag", [1, 5, 128])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_forward_matches_reference(device, dtype, dim, bag, index_dtype):
    check_forward(*bag_inputs(device, dtype, tokens=37, bag=bag, rows=300, dim=dim, index_dtype=index_dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_in_values_dtype(device, dtype):
    check_forward(*bag_inputs(device, dtype, tokens=9, bag=6, rows=64, dim=24, weight_dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("dim,bag,rows", [(1, 1, 5), (3, 7, 11), (96, 128, 300), (1000, 16, 50), (33, 4000, 3)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_backward_matches_reference(device, dtype, dim, bag, rows, index_dtype):
    # (33, 4000, 3): 12000 lookups on 3 rows, runs longer than one backward segment.
    tokens = 3 if bag == 4000 else 29
    inputs = backward_inputs(device, dtype, tokens=tokens, bag=bag, rows=rows, dim=dim, index_dtype=index_dtype)
    if bag == 4000:
        assert longest_run(inputs[2]) > BACKWARD_SEGMENT["cpu"]
    r, rg, _ = check_backward(*inputs)
    dense = ops.rows_to_dense(r, rg, rows)
    assert torch.equal(dense, rows_to_dense_ref(r, rg, rows))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_weight_gradient_paths_agree_bitwise(dtype):
    """The CPU weight gradient takes rows of 272 in column chunks and rows of 273 one dot per
    lookup; both add each of 16 lanes in column order, so a zero column appended changes
    nothing, bit for bit, on Gaussian inputs (where the order of the sums shows)."""
    grad_out, values, indices, weights = backward_inputs("cpu", dtype, tokens=37, bag=24, rows=500, dim=272)
    pad = lambda t: torch.cat([t, torch.zeros_like(t[:, :1])], dim=1)  # noqa: E731
    chunked = ops.embedding_bag_backward(grad_out, values, indices, weights, True)[2]
    per_lookup = ops.embedding_bag_backward(pad(grad_out), pad(values), indices, weights, True)[2]
    assert torch.equal(chunked, per_lookup)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("pattern,hot,tokens,bag", [("random", 0.0, 29, 128), ("all_equal", 0.0, 9, 1000),
                                                    ("random", 0.9, 40, 200), ("distinct", 0.0, 16, 16)])
@pytest.mark.parametrize("weights_in_values_dtype", [False, True])
@pytest.mark.parametrize("dim", [40, 272])
def test_dyadic_inputs_give_exact_results(device, dtype, pattern, hot, tokens, bag, weights_in_values_dtype, dim):
    """Integers / 32 and weights k / 8: every float32 partial sum is exact, in any order, so
    the forward, the row gradients (runs of up to 9000 positions, several segments) and the
    weight gradient equal the float64 reference rounded once, bit for bit. Rows of 40 take
    the CPU weight gradient's one-dot-per-lookup path, rows of 272 its column chunks (two
    full, one short)."""
    weight_dtype = dtype if weights_in_values_dtype else None
    grad_out, values, indices, weights = backward_inputs(device, dtype, tokens=tokens, bag=bag, rows=4096, dim=dim,
                                                         pattern=pattern, hot=hot, kind="dyadic",
                                                         weight_dtype=weight_dtype)
    assert torch.equal(ops.embedding_bag(values, indices, weights), embedding_bag_ref(values, indices, weights))
    rows, rows_grad, weights_grad = ops.embedding_bag_backward(grad_out, values, indices, weights, True)
    ref_rows, ref_rg, ref_wg = embedding_bag_backward_sparse_ref(grad_out, values, indices, weights)
    assert torch.equal(rows, ref_rows)
    assert torch.equal(rows_grad, ref_rg)
    assert torch.equal(weights_grad, ref_wg)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("dim", [16, 32, 64, 128, 256, 384, 512, 640, 1024])
def test_forward_strategies_are_exact(device, dtype, dim):
    """Both CPU gather strategies (rows summed in registers for dims 16/32/64 and multiples
    of 128 up to 1 KiB rows; 16 rows side by side otherwise), with every remainder of a bag
    against blocks of 16 and 4 rows: dyadic inputs, so each must equal the reference bit for
    bit."""
    for bag in [0, 1, 3, 4, 17, 33, 128]:
        values, indices, weights = bag_inputs(device, dtype, tokens=19, bag=bag, rows=300, dim=dim, kind="dyadic")
        out = ops.embedding_bag(values, indices, weights)
        assert torch.equal(out, embedding_bag_ref(values, indices, weights)), f"bag {bag}"


def test_backward_without_weights_grad(device):
    grad_out, values, indices, weights = backward_inputs(device, torch.float32, tokens=10, bag=4, rows=50, dim=8)
    rows, rows_grad, weights_grad = check_backward(grad_out, values, indices, weights, False)
    full = ops.embedding_bag_backward(grad_out, values, indices, weights, True)
    assert torch.equal(rows, full[0]) and torch.equal(rows_grad, full[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_matches_reference(device, dtype):
    grad_out, values, indices, weights = backward_inputs(device, dtype, tokens=23, bag=9, rows=200, dim=40)
    values.requires_grad_(True)
    weights.requires_grad_(True)
    memory_ext.embedding_bag(values, indices, weights).backward(grad_out)
    ref_gv, ref_gw = embedding_bag_backward_ref(grad_out, values.detach(), indices, weights.detach())
    torch.testing.assert_close(values.grad.double(), ref_gv, **tolerance(dtype, terms=longest_run(indices)))
    torch.testing.assert_close(weights.grad.double(), ref_gw, **tolerance(weights.dtype, terms=40))

def _same_codes(a, b):
    """Bitwise equal 16-bit tensors, where a NaN only has to meet a NaN (payloads may differ)."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a.view(torch.int16)[~nan], b.view(torch.int16)[~nan])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [40, 64])
def test_every_16_bit_code_is_read_exactly(device, dtype, dim):
    """Every fp16 / bf16 code (subnormals, infinities, NaNs, -0 included) as a value row and
    as an output gradient, each lookup a bag of one row of weight 1: the forward and the row
    gradient must return the codes unchanged. The weight gradient, the dot of a row of finite
    codes with a one-hot gradient row, must equal the one code it picks. Rows of 64 take the
    vector paths of the CPU kernels, rows of 40 their tails."""
    codes = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    codes = torch.cat([codes, codes[: (-codes.numel()) % dim]]).reshape(-1, dim).to(device)
    rows = codes.shape[0]
    indices = torch.arange(rows, device=device).reshape(-1, 1)
    weights = torch.ones(rows, 1, device=device)
    assert _same_codes(ops.embedding_bag(codes, indices, weights), codes)
    _, rows_grad, _ = ops.embedding_bag_backward(codes, codes, indices, weights, False)
    assert _same_codes(rows_grad, codes)

    finite = codes.reshape(-1)[torch.isfinite(codes.reshape(-1))]
    finite = finite[: finite.numel() // dim * dim].reshape(-1, dim)
    picked = torch.arange(finite.numel(), device=device) % dim  # lookup p picks element p % dim of its row
    indices = (torch.arange(finite.numel(), device=device) // dim).reshape(-1, 1)
    one_hot = torch.nn.functional.one_hot(picked, dim).to(dtype)
    weights = torch.ones(finite.numel(), 1, device=device)
    _, _, weights_grad = ops.embedding_bag_backward(one_hot, finite, indices, weights, True)
    assert torch.equal(weights_grad.reshape(-1), finite.reshape(-1).float())



@pytest.mark.parametrize("dim", [64, 128, 1024])  # 1024: rows side by side
def test_every_fp16_code_is_read_exactly_when_denormals_are_zero(dim):
    """The CPU forward's fp16 decode (vcvtph2ps on AVX-512, integer arithmetic elsewhere)
    with the CPU flushing denormals: fp16 subnormals are normal floats once widened and must
    come through unchanged. (bf16 subnormals are float32 subnormals, which the mode flushes
    in any float32 arithmetic.)"""
    dtype = torch.float16
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no denormals-are-zero mode")
    try:
        codes = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, dim)
        indices = torch.arange(codes.shape[0]).reshape(-1, 1)
        assert _same_codes(ops.embedding_bag(codes, indices, torch.ones(codes.shape[0], 1)), codes)
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("pattern,hot", [("all_equal", 0.0), ("distinct", 0.0), ("random", 0.5)])
def test_index_patterns(device, pattern, hot):
    """One run, all-distinct rows, and hot rows among random ones."""
    inputs = backward_inputs(device, torch.float32, tokens=64, bag=32, rows=4096, dim=17, pattern=pattern, hot=hot,
                             seed=3)
    check_forward(*inputs[1:], msg=pattern)
    check_backward(*inputs, msg=pattern)


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
    values, indices, weights = bag_inputs(device, torch.float32, tokens=20, bag=8, rows=100, dim=64)
    v = values[:, ::2]
    idx = indices.t().contiguous().t()
    w = weights.t().contiguous().t()
    assert not v.is_contiguous() and not idx.is_contiguous()
    check_forward(v, idx, w)


def test_backward_is_deterministic_across_runs_and_threads():
    grad_out, values, indices, weights = backward_inputs("cpu", torch.float32, tokens=300, bag=64, rows=1000, dim=96)
    indices[:, :20] = 5  # one long run plus many short ones
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
        assert all(torch.equal(a, b) for a, b in zip(ref, other, strict=True))


def test_rows_to_dense_rejects_bad_rows():
    grad = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="memory.rows_to_dense: rows must be strictly ascending"):
        ops.rows_to_dense(torch.tensor([3, 1]), grad, 5)
    with pytest.raises(RuntimeError, match="memory.rows_to_dense: rows\\[1\\] = 9 is out of range"):
        ops.rows_to_dense(torch.tensor([1, 9]), grad, 5)


def test_a_wrong_16_bit_result_fails_the_tolerance():
    """The tolerance of a 16-bit result is its rounding (one ulp), not a 16-bit absolute
    error: a result two ulps off, or one lookup short, must fail."""
    values, indices, weights = bag_inputs("cpu", torch.bfloat16, tokens=37, bag=128, rows=300, dim=96)
    out = ops.embedding_bag(values, indices, weights)
    ref = embedding_bag_ref(values, indices, weights, rounded=False)
    tol = tolerance(torch.bfloat16, terms=128)
    torch.testing.assert_close(out.double(), ref, **tol)
    two_ulps = out.double() * (1 + 2**-6)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(two_ulps, ref, **tol)
    one_short = ops.embedding_bag(values, indices[:, 1:], weights[:, 1:])
    with pytest.raises(AssertionError):
        torch.testing.assert_close(one_short.double(), ref, **tol)
    assert TOL[torch.bfloat16]["atol"] < 1e-4


# Hypothesis: random shapes, dtypes and index patterns; long_run forces a row with more
# than long_run backward segments (2048 positions each on the CPU) of lookups, through
# one repeated row (all_equal) or 90% of lookups on three rows (hot); dyadic inputs are
# checked bit for bit.
@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 300),
    dim=st.integers(1, 70),
    tokens=st.integers(0, 40),
    bag=st.integers(1, 50),
    dtype=st.sampled_from(DTYPES + [torch.float64]),
    pattern=st.sampled_from(["random", "all_equal", "distinct", "hot"]),
    long_run=st.integers(0, 2),
    kind=st.sampled_from(["gaussian", "dyadic"]),
    seed=st.integers(0, 2**16),
)
def test_property_forward_backward(rows, dim, tokens, bag, dtype, pattern, long_run, kind, seed):
    tokens, bag, pattern = long_run_shape(tokens, bag, pattern, long_run)
    hot = 0.9 if pattern == "hot" else 0.0
    inputs = backward_inputs("cpu", dtype, tokens=tokens, bag=bag, rows=rows, dim=dim, kind=kind, seed=seed,
                             pattern="random" if pattern == "hot" else pattern, hot=hot)
    grad_out, values, indices, weights = inputs
    if kind == "dyadic":
        assert torch.equal(ops.embedding_bag(values, indices, weights), embedding_bag_ref(values, indices, weights))
        got = ops.embedding_bag_backward(*inputs, True)
        want = embedding_bag_backward_sparse_ref(*inputs, True)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    else:
        check_forward(values, indices, weights)
        check_backward(*inputs)


def long_run_shape(tokens, bag, pattern, long_run):
    """(tokens, bag, pattern) with enough lookups for a run of more than long_run segments."""
    if not long_run:
        return tokens, bag, pattern
    pattern = pattern if pattern in ("all_equal", "hot") else "all_equal"
    share = 1.0 if pattern == "all_equal" else 0.25  # 0.9 of the lookups over three rows, with margin
    tokens = max(tokens, 1)
    lookups = int((long_run * BACKWARD_SEGMENT["cpu"] + 1) / share) + 1
    return tokens, max(bag, -(-lookups // tokens)), pattern


@pytest.mark.parametrize("pattern", ["all_equal", "hot", "random"])
@pytest.mark.parametrize("long_run", [1, 2])
def test_property_strategy_reaches_split_runs(pattern, long_run):
    """long_run in the strategy above does produce runs of more than long_run segments."""
    for tokens, bag in [(0, 1), (1, 1), (40, 50), (7, 3)]:
        t, b, p = long_run_shape(tokens, bag, pattern, long_run)
        _, _, indices, _ = backward_inputs("cpu", torch.float32, tokens=t, bag=b, rows=300, dim=1,
                                           pattern="random" if p == "hot" else p, hot=0.9 if p == "hot" else 0.0)
        assert longest_run(indices) > long_run * BACKWARD_SEGMENT["cpu"]

"""CUDA kernels of the embedding_bag family against plain PyTorch and the CPU kernels.

Covers what only the CUDA kernels can get wrong: launch shapes for every row width
(sub-warp, warp, block, tiled; vector and scalar paths), int32/int64 indices, hot rows
whose runs are split into segments, bitwise determinism, outputs fully written (poisoned
allocator cache), index validation on and off, empty inputs, the current stream and int64
offsets. Every test skips, with the reason, when no GPU is visible or the library was
built without its CUDA kernels; tests/test_cuda_emulation.py runs the kernel source itself
on the CPU.
"""
from __future__ import annotations

import pytest
import torch

from memory_ext import ops
from memory_ext.reference import embedding_bag_backward_sparse_ref as embedding_bag_backward_ref
from memory_ext.reference import embedding_bag_ref, rows_to_dense_ref
from memory_ext.testing import BACKWARD_SEGMENT, sample_inputs, tolerance

from conftest import requires_cuda

DEV = "cuda"
VALUE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Row widths that reach every launch shape: sub-warp (1, 3, 8), warp (96, 1000), block
# (4096 bf16), tiled (5000), and the scalar path (odd widths).
DIMS = [1, 3, 8, 96, 1000, 4096, 5000]
SEGMENT = BACKWARD_SEGMENT["cuda"]


def _assert_close(actual, expected, dtype, terms=128):
    """Both sides rounded to dtype (a rounded reference or the CPU kernel), each a float32
    (float64) sum of about ``terms`` products."""
    tol = tolerance(dtype, terms=terms, rounded_twice=True)
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), **tol)


def _random_case(tokens, bag, rows, dim, dtype, idx_dtype, w_dtype, hot=None, seed=0):
    """(values, indices, weights, grad_out) on the CPU (the CPU kernel is compared too);
    hot: a share of lookups on rows 0..2, long runs split into segments."""
    s = sample_inputs("embedding_bag_backward", "cpu", dtype, seed=seed, tokens=tokens, bag=bag, rows=rows, dim=dim,
                      index_dtype=idx_dtype, weight_dtype=w_dtype, hot=hot or 0.0)
    return s["values"], s["indices"], s["weights"], s["grad_out"]


def _longest_run(indices):
    return int(torch.bincount(indices.reshape(-1).long()).max()) if indices.numel() else 1


def _cuda(*tensors):
    return [t.to(DEV) for t in tensors]


def _poison_cache(*shapes_dtypes):
    """Leave NaN-filled (or 0x7f-filled) blocks of the given sizes in the allocator cache,
    so outputs allocated next likely start as poison: an element the kernel fails to
    write then shows up as a mismatch."""
    blocks = []
    for shape, dtype in shapes_dtypes:
        for _ in range(2):
            t = torch.empty(shape, dtype=dtype, device=DEV)
            if dtype.is_floating_point:
                t.fill_(float("nan"))
            else:
                t.fill_(0x7F)
            blocks.append(t)
    torch.cuda.synchronize()
    del blocks


# ---------------------------------------------------------------------------------------
def launch_grid(test):
    """Every row width of the launch table x bag 1 and 128 x value dtype x index dtype, on CUDA."""
    marks = [
        requires_cuda,
        pytest.mark.parametrize("dim", DIMS),
        pytest.mark.parametrize("bag", [1, 128]),
        pytest.mark.parametrize("dtype", VALUE_DTYPES),
        pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32]),
    ]
    for mark in reversed(marks):
        test = mark(test)
    return test


# Forward.


@launch_grid
def test_forward_matches_reference(dim, bag, dtype, idx_dtype):
    w_dtype = torch.float32 if idx_dtype == torch.int64 else dtype
    values, indices, weights, _ = _random_case(23, bag, 300, dim, dtype, idx_dtype, w_dtype, seed=dim + bag)
    _poison_cache(((23, dim), dtype))
    out = ops.embedding_bag(*_cuda(values, indices, weights))
    assert out.dtype == dtype and out.shape == (23, dim) and out.device.type == torch.device(DEV).type
    _assert_close(out, embedding_bag_ref(values, indices, weights), dtype, terms=bag)
    _assert_close(out, ops.embedding_bag(values, indices, weights), dtype, terms=bag)  # the CPU kernel


@requires_cuda
@pytest.mark.parametrize("bag", [0, 1, 5, 31, 33, 200])
def test_forward_any_bag(bag):
    values, indices, weights, _ = _random_case(9, bag, 50, 64, torch.float32, torch.int64, torch.float32)
    _poison_cache(((9, 64), torch.float32))
    out = ops.embedding_bag(*_cuda(values, indices, weights))
    _assert_close(out, embedding_bag_ref(values, indices, weights), torch.float32, terms=bag)


@requires_cuda
def test_forward_many_tokens():
    values, indices, weights, _ = _random_case(300_000, 2, 1000, 8, torch.float32, torch.int32, torch.float32)
    out = ops.embedding_bag(*_cuda(values, indices, weights))
    _assert_close(out, embedding_bag_ref(values, indices, weights), torch.float32)


@requires_cuda
def test_forward_unaligned_and_strided_inputs():
    # A values view starting one element into its storage forces the scalar path; a
    # transposed weights tensor is not contiguous.
    base = torch.randn(65 * 96 + 1, dtype=torch.bfloat16)
    values = base[1:].view(65, 96)
    indices = torch.randint(0, 65, (17, 9))
    weights = torch.randn(9, 17).t()
    vc, ic, wc = _cuda(base, indices, weights)
    out = ops.embedding_bag(vc[1:].view(65, 96), ic, wc)
    _assert_close(out, embedding_bag_ref(values, indices, weights), torch.bfloat16)
    # The backward with an unaligned table and grad_out (scalar loads).
    g_base = torch.randn(17 * 96 + 1, dtype=torch.bfloat16)
    grad_out = g_base[1:].view(17, 96)
    ref = embedding_bag_backward_ref(grad_out, values, indices, weights, True)
    gc = _cuda(g_base)[0][1:].view(17, 96)
    rows, rows_grad, wg = ops.embedding_bag_backward(gc, vc[1:].view(65, 96), ic, wc, True)
    assert torch.equal(rows.cpu(), ref[0])
    _assert_close(rows_grad, ref[1], torch.bfloat16, terms=_longest_run(indices))
    _assert_close(wg, ref[2], torch.float32, terms=96)


# ---------------------------------------------------------------------------------------
# Backward (sparse form) and rows_to_dense.


def _check_backward(values, indices, weights, grad_out, need_wg, dtype):
    ref_rows, ref_rg, ref_wg = embedding_bag_backward_ref(grad_out, values, indices, weights, need_wg)
    n_unique = ref_rows.numel()
    _poison_cache(((n_unique,), torch.int64), ((n_unique, values.shape[1]), dtype),
                  (tuple(indices.shape), weights.dtype))
    rows, rows_grad, wg = ops.embedding_bag_backward(*_cuda(grad_out, values, indices, weights), need_wg)
    assert torch.equal(rows.cpu(), ref_rows)  # only touched rows, ascending
    assert rows_grad.dtype == dtype and rows_grad.shape == (n_unique, values.shape[1])
    # A row's gradient sums its run; a weight's gradient is a dot product over dim, in the
    # weights' dtype (float32 weights: a float32 result, whatever the table's dtype).
    run, dim = _longest_run(indices), values.shape[1]
    _assert_close(rows_grad, ref_rg, dtype, terms=run)
    assert wg.dtype == weights.dtype
    if need_wg:
        _assert_close(wg, ref_wg, weights.dtype, terms=dim)
    else:
        assert wg.shape == (0,)
    # The CPU kernel is the specification: same rows, same sums within tolerance.
    c_rows, c_rg, c_wg = ops.embedding_bag_backward(grad_out, values, indices, weights, need_wg)
    assert torch.equal(rows.cpu(), c_rows)
    _assert_close(rows_grad, c_rg, dtype, terms=run)
    if need_wg:
        _assert_close(wg, c_wg, weights.dtype, terms=dim)
    return rows, rows_grad, wg


@launch_grid
def test_backward_matches_reference(dim, bag, dtype, idx_dtype):
    w_dtype = dtype if idx_dtype == torch.int64 else torch.float32
    values, indices, weights, grad_out = _random_case(23, bag, 300, dim, dtype, idx_dtype, w_dtype, seed=dim * 7 + bag)
    _check_backward(values, indices, weights, grad_out, True, dtype)


@requires_cuda
@pytest.mark.parametrize("dim", [3, 96, 1000, 4096, 5000, 1001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need_wg", [True, False])
def test_backward_hot_rows(dim, dtype, need_wg):
    # ~60% of 64 x 128 lookups hit rows 0..2: runs of ~1700 positions, several segments
    # each, folded by the second kernel.
    values, indices, weights, grad_out = _random_case(64, 128, 5000, dim, dtype, torch.int64, torch.float32, hot=0.6)
    counts = torch.bincount(indices.reshape(-1))
    assert counts.max() > 2 * SEGMENT
    _check_backward(values, indices, weights, grad_out, need_wg, dtype)


@requires_cuda
def test_backward_grad_out_dtype_differs():
    values, indices, weights, grad_out = _random_case(16, 8, 40, 32, torch.bfloat16, torch.int64, torch.float32)
    _check_backward(values, indices, weights, grad_out.float(), True, torch.bfloat16)


@requires_cuda
def test_backward_bitwise_deterministic():
    values, indices, weights, grad_out = _random_case(96, 128, 2000, 1024, torch.bfloat16, torch.int64,
                                                      torch.float32, hot=0.3, seed=3)
    args = _cuda(grad_out, values, indices, weights)
    first = ops.embedding_bag_backward(*args, True)
    for _ in range(3):
        again = ops.embedding_bag_backward(*args, True)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)
    fwd = ops.embedding_bag(*args[1:])
    assert torch.equal(fwd, ops.embedding_bag(*args[1:]))


@requires_cuda
@pytest.mark.parametrize("dim", [3, 96, 1000, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hot", [0.0, 0.6])
def test_dense_backward_is_the_sparse_backward_in_a_table(dim, dtype, hot):
    """embedding_bag_backward_dense (counts left on the device, the segment kernel writing
    rows of the table) equals rows_to_dense of the sparse backward bit for bit, on mostly
    unique rows (where the sparse form takes the short-run schedule) and on hot rows."""
    values, indices, weights, grad_out = _random_case(64, 128, 5000, dim, dtype, torch.int64, torch.float32,
                                                      hot=hot, seed=dim)
    args = _cuda(grad_out, values, indices, weights)
    rows, rows_grad, wg = ops.embedding_bag_backward(*args, True)
    for check in (True, False):
        dense, dense_wg = ops.embedding_bag_backward_dense(*args, True, check_indices=check)
        assert torch.equal(dense, ops.rows_to_dense(rows, rows_grad, values.shape[0]))
        assert torch.equal(dense_wg, wg)


@requires_cuda
def test_dense_backward_reports_or_skips_bad_lookups():
    values, indices, weights, grad_out = _random_case(6, 5, 50, 16, torch.float32, torch.int64, torch.float32)
    indices[2, 3] = 1000
    v, i, w, g = _cuda(values, indices, weights, grad_out)
    msg = r"memory\.embedding_bag_backward_dense: index out of range: indices\[2, 3\] = 1000 but values has 50 rows"
    with pytest.raises(RuntimeError, match=msg):
        ops.embedding_bag_backward_dense(g, v, i, w)
    # Unchecked: the bad lookup adds nothing and gets a zero weight gradient.
    dense, wg = ops.embedding_bag_backward_dense(g, v, i, w, check_indices=False)
    w0 = w.clone()
    w0[2, 3] = 0
    want, want_wg = ops.embedding_bag_backward_dense(g, v, i.clamp(0, 49), w0)
    assert torch.equal(dense, want)
    assert wg[2, 3] == 0
    wg[2, 3] = want_wg[2, 3]
    assert torch.equal(wg, want_wg)
    with ops.index_checks("async"):
        ops.embedding_bag_backward_dense(g, v, i, w)
        with pytest.raises(RuntimeError, match=msg):
            ops.check_errors()


@requires_cuda
@pytest.mark.parametrize("dim", [1, 3, 96, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.uint8])
def test_rows_to_dense(dim, dtype):
    n_rows = 777
    s = sample_inputs("rows_to_dense", "cpu", dtype, seed=dim, n_rows=n_rows, n_unique=200, dim=dim)
    rows, rows_grad = s["rows"], s["rows_grad"]
    _poison_cache(((n_rows, dim), dtype))
    dense = ops.rows_to_dense(*_cuda(rows, rows_grad), n_rows)
    assert torch.equal(dense.cpu(), rows_to_dense_ref(rows, rows_grad, n_rows))  # untouched rows are zeros, not poison
    assert torch.equal(dense.cpu(), ops.rows_to_dense(rows, rows_grad, n_rows))


@requires_cuda
def test_rows_to_dense_empty():
    rows = torch.empty(0, dtype=torch.int64, device=DEV)
    assert torch.equal(ops.rows_to_dense(rows, torch.empty(0, 5, device=DEV), 4).cpu(), torch.zeros(4, 5))
    assert ops.rows_to_dense(rows, torch.empty(0, 5, device=DEV), 0).shape == (0, 5)


@requires_cuda
def test_autograd_matches_cpu():
    values, indices, weights, grad_out = _random_case(40, 16, 100, 96, torch.float32, torch.int64, torch.float32,
                                                      hot=0.2)
    grads = []
    for device in ("cpu", DEV):
        v = values.to(device).requires_grad_()
        w = weights.to(device).requires_grad_()
        ops.embedding_bag(v, indices.to(device), w).backward(grad_out.to(device))
        grads.append((v.grad.cpu(), w.grad.cpu()))
    _assert_close(grads[1][0], grads[0][0], torch.float32, terms=_longest_run(indices))
    _assert_close(grads[1][1], grads[0][1], torch.float32, terms=96)


# ---------------------------------------------------------------------------------------
# Index validation.


@requires_cuda
def test_bad_index_raises_clear_error():
    values, indices, weights, grad_out = _random_case(4, 5, 50, 16, torch.float32, torch.int64, torch.float32)
    indices[2, 3] = 1000
    indices[3, 1] = -1  # later position: the lowest bad one is reported
    v, i, w, g = _cuda(values, indices, weights, grad_out)
    assert ops.index_checks_enabled()
    msg = r"memory\.embedding_bag: index out of range: indices\[2, 3\] = 1000 but values has 50 rows"
    with pytest.raises(RuntimeError, match=msg):
        ops.embedding_bag(v, i, w)
    msg = r"memory\.embedding_bag_backward: index out of range: indices\[2, 3\] = 1000 but values has 50 rows"
    with pytest.raises(RuntimeError, match=msg):
        ops.embedding_bag_backward(g, v, i, w, True)
    with pytest.raises(RuntimeError, match=r"indices\[0, 0\] = -7 but values has 50 rows"):
        ops.embedding_bag(v, torch.full_like(i, -7), w)
    # The device is still usable after a reported error.
    assert torch.isfinite(ops.embedding_bag(v, i.clamp(0, 49), w)).all()


@requires_cuda
def test_bad_rows_raise_clear_error():
    rg = torch.randn(3, 4, device=DEV)
    with pytest.raises(RuntimeError, match=r"memory\.rows_to_dense: rows\[2\] = 9 is out of range for n_rows = 9"):
        ops.rows_to_dense(torch.tensor([0, 4, 9], device=DEV), rg, 9)
    with pytest.raises(RuntimeError, match=r"rows must be strictly ascending, but rows\[0\] = 4 and rows\[1\] = 4"):
        ops.rows_to_dense(torch.tensor([4, 4, 5], device=DEV), rg, 9)


@requires_cuda
def test_index_checks_off_skips_bad_lookups():
    values, indices, weights, grad_out = _random_case(6, 7, 30, 24, torch.float32, torch.int32, torch.float32)
    bad = torch.zeros_like(indices, dtype=torch.bool)
    bad[1, 2] = bad[4, 0] = bad[5, 6] = True
    indices[1, 2], indices[4, 0], indices[5, 6] = 30, -3, 2**31 - 1
    # Reference: a bad lookup is absent (weight zero, and zero weight gradient).
    ref_idx = indices.masked_fill(bad, 0)
    ref_w = weights.masked_fill(bad, 0.0)
    v, i, w, g = _cuda(values, indices, weights, grad_out)
    with ops.index_checks(False):
        assert not ops.index_checks_enabled()
        out = ops.embedding_bag(v, i, w)
        rows, rows_grad, wg = ops.embedding_bag_backward(g, v, i, w, True)
        dense = ops.rows_to_dense(torch.tensor([1, 3, 99], device=DEV), torch.ones(3, 2, device=DEV), 5)
    assert ops.index_checks_enabled()  # restored
    _assert_close(out, embedding_bag_ref(values, ref_idx, ref_w), torch.float32)
    valid = indices[~bad].long()
    ref_rows, ref_rg, _ = embedding_bag_backward_ref(grad_out, values, ref_idx, ref_w, False)
    keep = torch.isin(ref_rows, valid)  # row 0 may appear only through the masked entries
    assert torch.equal(rows.cpu(), ref_rows[keep])
    _assert_close(rows_grad, ref_rg[keep], torch.float32)
    _, _, ref_wg = embedding_bag_backward_ref(grad_out, values, ref_idx, weights, True)
    _assert_close(wg, ref_wg.masked_fill(bad, 0.0), torch.float32)
    # Out-of-range sparse rows are ignored, in-range ones written, the rest zero.
    expected = torch.zeros(5, 2)
    expected[[1, 3]] = 1.0
    assert torch.equal(dense.cpu(), expected)


# ---------------------------------------------------------------------------------------
# Shapes at the edges, streams, offsets past 2^31, opcheck.


@requires_cuda
def test_empty_inputs():
    v = torch.randn(10, 8, device=DEV)
    for tokens, bag in [(0, 4), (3, 0), (0, 0)]:
        i = torch.zeros(tokens, bag, dtype=torch.int64, device=DEV)
        w = torch.zeros(tokens, bag, device=DEV)
        out = ops.embedding_bag(v, i, w)
        assert out.shape == (tokens, 8) and (out == 0).all()
        rows, rows_grad, wg = ops.embedding_bag_backward(torch.randn(tokens, 8, device=DEV), v, i, w, True)
        assert rows.shape == (0,) and rows_grad.shape == (0, 8) and wg.shape == (tokens, bag)
    v0 = torch.randn(10, 0, device=DEV)
    i = torch.randint(0, 10, (3, 4), device=DEV)
    w = torch.randn(3, 4, device=DEV)
    assert ops.embedding_bag(v0, i, w).shape == (3, 0)
    rows, rows_grad, wg = ops.embedding_bag_backward(torch.randn(3, 0, device=DEV), v0, i, w, True)
    assert torch.equal(rows.cpu(), torch.unique(i.cpu())) and rows_grad.shape == (rows.numel(), 0)
    assert (wg == 0).all()


@requires_cuda
def test_runs_on_current_stream():
    # The side stream is busy (sleep) before it produces the inputs; a kernel launched on
    # any other stream would read them unwritten.
    values, indices, weights, grad_out = _random_case(64, 32, 500, 256, torch.float32, torch.int64, torch.float32)
    src = _cuda(values, indices, weights, grad_out)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        v, i, w, g = (t.clone() for t in src)
        out = ops.embedding_bag(v, i, w)
        rows, rows_grad, wg = ops.embedding_bag_backward(g, v, i, w, True)
        dense = ops.rows_to_dense(rows, rows_grad, 500)
    side.synchronize()
    _assert_close(out, embedding_bag_ref(values, indices, weights), torch.float32)
    ref_rows, ref_rg, ref_wg = embedding_bag_backward_ref(grad_out, values, indices, weights, True)
    assert torch.equal(rows.cpu(), ref_rows)
    _assert_close(rows_grad, ref_rg, torch.float32)
    _assert_close(wg, ref_wg, torch.float32, terms=256)
    expected = torch.zeros(500, 256)
    expected[ref_rows] = ref_rg
    _assert_close(dense, expected, torch.float32)


@requires_cuda
def test_offsets_past_int32():
    # rows * dim > 2^31: row offsets must be 64-bit. Lookups touch the last rows only.
    rows, dim = 2**20 + 8, 2048
    need = 2 * rows * dim * 2 + (1 << 30)  # table and its dense gradient, bf16
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need >> 30} GiB of free GPU memory")
    values = torch.randn(rows, dim, device=DEV, dtype=torch.bfloat16)
    indices = torch.randint(rows - 8, rows, (5, 6), device=DEV)
    indices[0, 0] = 0
    weights = torch.randn(5, 6, device=DEV)
    grad_out = torch.randn(5, dim, device=DEV, dtype=torch.bfloat16)
    # References on the touched rows only (a float copy of the whole table would not fit).
    touched, compact = torch.unique(indices, return_inverse=True)
    small = values[touched]
    out = ops.embedding_bag(values, indices, weights)
    _assert_close(out, embedding_bag_ref(small, compact, weights), torch.bfloat16)
    r, rg, wg = ops.embedding_bag_backward(grad_out, values, indices, weights, True)
    ref_rows, ref_rg, ref_wg = embedding_bag_backward_ref(grad_out, small, compact, weights, True)
    assert torch.equal(r, touched[ref_rows])
    _assert_close(rg, ref_rg, torch.bfloat16)
    _assert_close(wg, ref_wg, torch.float32, terms=dim)
    dense = ops.rows_to_dense(r, rg, rows)
    assert torch.equal(dense[r], rg) and not dense[1 : rows - 8].any()
    del values, dense


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    values, indices, weights, grad_out = _random_case(8, 5, 20, 16, dtype, torch.int64, torch.float32)
    v, i, w, g = _cuda(values, indices, weights, grad_out)
    torch.library.opcheck(torch.ops.memory.embedding_bag.default, (v.requires_grad_(), i, w.requires_grad_()))
    torch.library.opcheck(torch.ops.memory.embedding_bag_backward.default, (g, v.detach(), i, w.detach(), True))
    rows, rows_grad, _ = ops.embedding_bag_backward(g, v.detach(), i, w.detach(), False)
    torch.library.opcheck(torch.ops.memory.rows_to_dense.default, (rows, rows_grad, 20))


@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    values, indices, weights, _ = _random_case(8, 5, 20, 16, torch.float32, torch.int64, torch.float32)
    out = ops.embedding_bag(values.to("cuda:1"), indices.to("cuda:1"), weights.to("cuda:1"))
    assert out.device == torch.device("cuda:1")
    _assert_close(out, embedding_bag_ref(values, indices, weights), torch.float32)

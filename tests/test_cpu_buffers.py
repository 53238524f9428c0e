"""The pool behind the CPU kernels' large outputs (csrc/cpu/large_buffers.h): outputs of
8 MiB and more reuse the blocks earlier outputs gave back. A reused block holds an earlier
output's bytes, so each op must write every element: these tests make a block dirty with
one output and check the next output that takes it against the reference, bit for bit."""
import gc
import os
import subprocess
import sys

import pytest
import torch

from memory_ext import ops
from memory_ext.reference import embedding_bag_backward_sparse_ref, embedding_bag_ref, rows_to_dense_ref
from memory_ext.testing import sample_inputs

POOLED = 8 << 20  # the smallest pooled output, in bytes

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.environ.get("MEMORY_EXT_CPU_BUFFER_CACHE_MB", "") != "",
    reason="the pool exists on Linux, and these tests assume its default cap")


@pytest.fixture(autouse=True)
def empty_pool():
    """An empty pool, and no garbage collection while a test runs: a collected tensor of
    another test would give its block back midway and change the pool's byte count."""
    gc.collect()
    gc.disable()
    ops.release_cpu_buffers()
    yield
    gc.enable()
    ops.release_cpu_buffers()


def dyadic_backward(dtype, tokens, bag, rows, dim, pattern="random", seed=0):
    return sample_inputs("embedding_bag_backward", "cpu", dtype, tokens=tokens, bag=bag, rows=rows, dim=dim,
                         pattern=pattern, kind="dyadic", seed=seed)


def test_a_freed_large_output_is_kept_and_released():
    s = sample_inputs("rows_to_dense", "cpu", torch.float32, n_rows=8192, n_unique=100, dim=256)
    out = ops.rows_to_dense(s["rows"], s["rows_grad"], 8192)
    assert out.nbytes >= POOLED
    assert ops.cpu_buffer_cache_bytes() == 0  # held by out
    del out
    kept = ops.cpu_buffer_cache_bytes()
    assert kept >= POOLED
    assert ops.release_cpu_buffers() == kept
    assert ops.cpu_buffer_cache_bytes() == 0


def test_small_outputs_do_not_use_the_pool():
    s = sample_inputs("rows_to_dense", "cpu", torch.float32, n_rows=1024, n_unique=10, dim=64)  # 256 KiB
    out = ops.rows_to_dense(s["rows"], s["rows_grad"], 1024)
    del out
    assert ops.cpu_buffer_cache_bytes() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rows_to_dense_into_a_dirty_block(dtype):
    """The second call takes the first call's block (full of its rows): every row it does
    not copy must still come out zero."""
    n_rows, dim = 8192, POOLED // (8192 * dtype.itemsize)
    first = sample_inputs("rows_to_dense", "cpu", dtype, n_rows=n_rows, n_unique=n_rows, dim=dim, seed=1)
    dirty = ops.rows_to_dense(first["rows"], first["rows_grad"], n_rows)
    ptr = dirty.data_ptr()
    del dirty
    second = sample_inputs("rows_to_dense", "cpu", dtype, n_rows=n_rows, n_unique=37, dim=dim, seed=2)
    out = ops.rows_to_dense(second["rows"], second["rows_grad"], n_rows)
    assert out.data_ptr() == ptr  # the block was reused
    assert torch.equal(out, rows_to_dense_ref(second["rows"], second["rows_grad"], n_rows))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [128, 1000])  # both gather strategies
def test_forward_into_a_dirty_block(dtype, dim):
    tokens = POOLED // (dim * dtype.itemsize) + 3
    for seed in (1, 2):
        s = sample_inputs("embedding_bag", "cpu", dtype, tokens=tokens, bag=3, rows=500, dim=dim, kind="dyadic",
                          seed=seed)
        out = ops.embedding_bag(s["values"], s["indices"], s["weights"])
        assert out.nbytes >= POOLED
        assert torch.equal(out, embedding_bag_ref(s["values"], s["indices"], s["weights"])), f"seed {seed}"
        del out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_into_a_dirty_block(dtype):
    """Row gradients of ~9000 distinct rows (over 8 MiB), twice, the second into the first's
    block; also a larger output than the free block, which must not be handed it."""
    dim = 512
    for seed, tokens in ((1, 9000), (2, 8500), (3, 12000)):
        s = dyadic_backward(dtype, tokens, 1, 60000, dim, pattern="distinct", seed=seed)
        rows, rows_grad, weights_grad = ops.embedding_bag_backward(*list(s.values()))
        assert rows_grad.nbytes >= POOLED
        ref_rows, ref_rg, ref_wg = embedding_bag_backward_sparse_ref(s["grad_out"], s["values"], s["indices"],
                                                                     s["weights"])
        assert torch.equal(rows, ref_rows) and torch.equal(rows_grad, ref_rg) and torch.equal(weights_grad, ref_wg)
        del rows, rows_grad, weights_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim,tokens,rows", [(520, 20000, 60000), (36, 200000, 400000), (33, 200000, 400000)])
def test_streamed_16_bit_row_gradients(dtype, dim, tokens, rows):
    """Row gradients of 8 MiB or more are written with streaming stores, 16-bit ones rounded
    a 64-byte block at a time: rows whose length is no multiple of the block (a tail) must
    come out exact, and so must rows that start off a 16-byte boundary and take plain
    stores (dim 33: seven rows in eight)."""
    s = dyadic_backward(dtype, tokens, 1, rows, dim, seed=dim)
    rows_out, rows_grad, weights_grad = ops.embedding_bag_backward(*list(s.values()))
    assert rows_grad.nbytes >= POOLED
    ref_rows, ref_rg, ref_wg = embedding_bag_backward_sparse_ref(s["grad_out"], s["values"], s["indices"],
                                                                 s["weights"])
    assert torch.equal(rows_out, ref_rows) and torch.equal(rows_grad, ref_rg) and torch.equal(weights_grad, ref_wg)


def test_live_outputs_never_share_a_block():
    s = sample_inputs("rows_to_dense", "cpu", torch.float32, n_rows=8192, n_unique=100, dim=256)
    outs = [ops.rows_to_dense(s["rows"], s["rows_grad"], 8192) for _ in range(3)]
    ptrs = {o.data_ptr() for o in outs}
    assert len(ptrs) == 3
    del outs[1]
    again = ops.rows_to_dense(s["rows"], s["rows_grad"], 8192)
    assert again.data_ptr() not in {outs[0].data_ptr(), outs[1].data_ptr()}
    ref = rows_to_dense_ref(s["rows"], s["rows_grad"], 8192)
    assert all(torch.equal(o, ref) for o in (*outs, again))


def test_a_zero_cache_turns_the_pool_off():
    code = (
        "import torch; from memory_ext import ops; from memory_ext.testing import sample_inputs\n"
        "s = sample_inputs('rows_to_dense', 'cpu', torch.float32, n_rows=8192, n_unique=100, dim=256)\n"
        "out = ops.rows_to_dense(s['rows'], s['rows_grad'], 8192); del out\n"
        "print(ops.cpu_buffer_cache_bytes())\n"
    )
    env = dict(os.environ, MEMORY_EXT_CPU_BUFFER_CACHE_MB="0")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "0"

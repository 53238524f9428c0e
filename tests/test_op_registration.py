"""opcheck, float64 gradcheck and torch.compile for every op."""
import pytest
import torch

import memory_ext
from memory_ext import ops


def _eb_inputs(device, requires_grad=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(30, 7, generator=g, dtype=dtype).to(device)
    indices = torch.randint(0, 30, (6, 5), generator=g).to(device)
    weights = torch.randn(6, 5, generator=g, dtype=dtype).to(device)
    return values.requires_grad_(requires_grad), indices, weights.requires_grad_(requires_grad)


def _pk_inputs(device, requires_grad=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    query = torch.randn(5, 2, 8, generator=g, dtype=dtype).to(device)
    keys = torch.randn(2, 2, 9, 4, generator=g, dtype=dtype).to(device)
    return query.requires_grad_(requires_grad), keys.requires_grad_(requires_grad)


def test_opcheck_embedding_bag(device):
    for rg in (False, True):
        torch.library.opcheck(torch.ops.memory.embedding_bag.default, _eb_inputs(device, rg))


def test_opcheck_embedding_bag_backward(device):
    values, indices, weights = _eb_inputs(device)
    grad_out = torch.randn(6, 7, device=device)
    for need in (True, False):
        torch.library.opcheck(torch.ops.memory.embedding_bag_backward.default, (grad_out, values, indices, weights, need))


def test_opcheck_rows_to_dense(device):
    rows = torch.tensor([0, 3, 4, 9], device=device)
    torch.library.opcheck(torch.ops.memory.rows_to_dense.default, (rows, torch.randn(4, 5, device=device), 12))


def test_opcheck_pk_topk(device):
    for rg in (False, True):
        torch.library.opcheck(torch.ops.memory.pk_topk.default, (*_pk_inputs(device, rg), 4))


def test_gradcheck_embedding_bag():
    values, indices, weights = _eb_inputs("cpu", True, torch.float64)
    assert torch.autograd.gradcheck(lambda v, w: ops.embedding_bag(v, indices, w), (values, weights))


def test_gradcheck_pk_topk():
    query, keys = _pk_inputs("cpu", True, torch.float64)
    assert torch.autograd.gradcheck(lambda q, k: ops.pk_topk(q, k, 4)[0], (query, keys))


def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def lookup(query, keys, values):
        scores, indices = memory_ext.pk_topk(query, keys, 4)
        weights = torch.softmax(scores, dim=-1).flatten(1)
        return memory_ext.embedding_bag(values, indices.flatten(1), weights)

    query, keys = _pk_inputs(device, True)
    values = torch.randn(81, 6, device=device, requires_grad=True)
    compiled = torch.compile(lookup, fullgraph=True, backend="aot_eager")
    out = compiled(query, keys, values)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (query, keys, values)]
    for t in (query, keys, values):
        t.grad = None
    eager = lookup(query, keys, values)
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager)
    for g, t in zip(grads, (query, keys, values)):
        torch.testing.assert_close(g, t.grad)


def test_import_does_not_initialise_cuda():
    import subprocess
    import sys

    code = "import torch, memory_ext; assert not torch.cuda.is_initialized(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_cpu_kernels_are_built_with_openmp():
    # at::parallel_for is an OpenMP pragma: without OpenMP every CPU kernel is serial.
    import sys

    from memory_ext import _C

    if not sys.platform.startswith("linux"):
        pytest.skip("OpenMP builds are set up for Linux only")
    assert _C.with_openmp, "memory_ext was compiled without OpenMP; its CPU kernels would run on one thread"

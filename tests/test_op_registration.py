"""opcheck, float64 gradcheck and torch.compile for every op, on memory_ext.testing's inputs."""
import pytest
import torch

import memory_ext
from memory_ext import ops
from memory_ext.testing import SAMPLE_OPS, op_args, sample_inputs


def _eb_inputs(device, requires_grad=False, dtype=torch.float32):
    s = sample_inputs("embedding_bag", device, dtype, tokens=6, bag=5, rows=30, dim=7, weight_dtype=dtype)
    return s["values"].requires_grad_(requires_grad), s["indices"], s["weights"].requires_grad_(requires_grad)


def _pk_inputs(device, requires_grad=False, dtype=torch.float32):
    s = sample_inputs("pk_topk", device, dtype, tokens=5, heads=2, n_keys=9, half=4)
    return s["query"].requires_grad_(requires_grad), s["keys"].requires_grad_(requires_grad)


def test_every_op_has_sample_inputs():
    schemas = {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("memory::")}
    kernels = {name for name in schemas if torch._C._dispatch_has_kernel_for_dispatch_key(f"memory::{name}", "CPU")}
    assert kernels <= set(SAMPLE_OPS), f"no sample_inputs for {sorted(kernels - set(SAMPLE_OPS))}"


@pytest.mark.parametrize("op", SAMPLE_OPS)
def test_sample_inputs_are_seeded_and_drawn_on_the_device(device, op):
    a, b, c = (sample_inputs(op, device, seed=seed) for seed in (0, 0, 1))
    tensors = [name for name, t in a.items() if isinstance(t, torch.Tensor)]
    assert all(a[name].device.type == device for name in tensors)
    assert all(torch.equal(a[name], b[name]) for name in tensors)
    assert any(not torch.equal(a[name], c[name]) for name in tensors)


def test_opcheck_embedding_bag(device):
    for rg in (False, True):
        torch.library.opcheck(torch.ops.memory.embedding_bag.default, _eb_inputs(device, rg))


def test_opcheck_embedding_bag_backward(device):
    for need in (True, False):
        s = sample_inputs("embedding_bag_backward", device, tokens=6, bag=5, rows=30, dim=7, need_weights_grad=need)
        torch.library.opcheck(torch.ops.memory.embedding_bag_backward.default, op_args(s))


def test_opcheck_embedding_bag_backward_dense(device):
    for need in (True, False):
        s = sample_inputs("embedding_bag_backward_dense", device, tokens=6, bag=5, rows=30, dim=7,
                          need_weights_grad=need)
        torch.library.opcheck(torch.ops.memory.embedding_bag_backward_dense.default, (*op_args(s), False))
        torch.library.opcheck(torch.ops.memory.embedding_bag_backward_dense.default, op_args(s))


def test_opcheck_rows_to_dense(device):
    s = sample_inputs("rows_to_dense", device, n_rows=12, n_unique=4, dim=5)
    torch.library.opcheck(torch.ops.memory.rows_to_dense.default, op_args(s))


def test_opcheck_pk_topk(device):
    for rg in (False, True):
        torch.library.opcheck(torch.ops.memory.pk_topk.default, (*_pk_inputs(device, rg), 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_row_adam_(device, dtype):
    s = sample_inputs("row_adam_", device, dtype, n_rows=10, dim=4, n_unique=3)
    torch.library.opcheck(torch.ops.memory.row_adam_.default, op_args(s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_unique", [0, 3])
def test_opcheck_row_adam_capturable_(device, dtype, n_unique):
    s = sample_inputs("row_adam_capturable_", device, dtype, n_rows=10, dim=4, n_unique=n_unique)
    torch.library.opcheck(torch.ops.memory.row_adam_capturable_.default, op_args(s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n_unique", [0, 3])
def test_opcheck_row_adagrad_(device, dtype, n_unique):
    s = sample_inputs("row_adagrad_", device, dtype, n_rows=10, dim=4, n_unique=n_unique)
    torch.library.opcheck(torch.ops.memory.row_adagrad_.default, op_args(s))


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
    for g, t in zip(grads, (query, keys, values), strict=True):
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


def test_sanitizer_cases_dry_run_on_the_cpu(tmp_path):
    """bench/sanitize_cases.py runs its cases on the CPU kernels (so the script cannot rot
    where no GPU is) and records every op in its report."""
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "sanitize_cases.py")
    spec = importlib.util.spec_from_file_location("sanitize_cases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = tmp_path / "report.json"
    assert module.main(["--device", "cpu", "--report", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["device"] == "cpu" and not result["errors"]
    assert set(result["ran"]) == set(SAMPLE_OPS)

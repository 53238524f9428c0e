"""Every rejected input raises an error that names the op and the problem, and the fake
kernels (FakeTensorMode, meta tensors, torch.compile tracing) raise the kernels' own message.

One list of cases (CASES) feeds the kernel tests and the fake-kernel tests: each case is
an op, a builder of its arguments and the exact message the CPU kernel raises.
"""
import re
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memory_ext import ops
from memory_ext._checks import accumulation_dtype, dtype_name

M = torch.ops.memory
META = "meta"  # a second device that every machine has


def eb(values=None, indices=None, weights=None):
    values = torch.randn(10, 4) if values is None else values
    indices = torch.randint(0, 10, (3, 2)) if indices is None else indices
    weights = torch.rand(3, 2) if weights is None else weights
    return values, indices, weights


def ebb(grad_out=None, **kwargs):
    grad_out = torch.randn(3, 4) if grad_out is None else grad_out
    return (grad_out, *eb(**kwargs), True)


def r2d(rows=None, rows_grad=None, n_rows=5):
    rows = torch.arange(3) if rows is None else rows
    rows_grad = torch.randn(3, 2) if rows_grad is None else rows_grad
    return rows, rows_grad, n_rows


def adam(param=None, exp_avg=None, exp_avg_sq=None, rows=None, rows_grad=None, beta1=0.9, beta2=0.999, step=1):
    param = torch.randn(10, 4) if param is None else param
    exp_avg = torch.zeros(10, 4) if exp_avg is None else exp_avg
    exp_avg_sq = torch.zeros(10, 4) if exp_avg_sq is None else exp_avg_sq
    rows = torch.tensor([1, 4, 7]) if rows is None else rows
    rows_grad = torch.randn(3, 4) if rows_grad is None else rows_grad
    return param, exp_avg, exp_avg_sq, rows, rows_grad, 1e-2, beta1, beta2, 1e-8, 0.0, step


def adagrad(param=None, sum_sq=None, rows=None, rows_grad=None, lr=1e-2, eps=1e-10, weight_decay=0.0):
    param = torch.randn(10, 4) if param is None else param
    sum_sq = torch.zeros(10) if sum_sq is None else sum_sq
    rows = torch.tensor([1, 4, 7]) if rows is None else rows
    rows_grad = torch.randn(3, 4) if rows_grad is None else rows_grad
    return param, sum_sq, rows, rows_grad, lr, eps, weight_decay


def pk(query=None, keys=None, k=3):
    query = torch.randn(4, 2, 8) if query is None else query
    keys = torch.randn(2, 2, 5, 4) if keys is None else keys
    return query, keys, k


# Embedding-bag cases, also run through the sharded lookup where it takes the same inputs
# (its own table, so no case that changes values; any floating weights are accepted).
EB_CASES = [
    ("values_1d", dict(values=torch.randn(10)), "values must be 2-D (rows, dim), got 1-D shape [10]", False),
    ("indices_1d", dict(indices=torch.randint(0, 10, (6,))), "indices must be 2-D (tokens, bag), got shape [6]", True),
    ("weights_shape", dict(weights=torch.rand(3, 3)), "weights must have the shape of indices [3, 2], got [3, 3]", True),
    ("values_int", dict(values=torch.randint(0, 3, (10, 4))),
     "values must be float32, bfloat16, float16 or float64, got Long", False),
    ("indices_float", dict(indices=torch.zeros(3, 2)), "indices must be int64 or int32, got Float", True),
    ("weights_fp64", dict(weights=torch.rand(3, 2, dtype=torch.float64)),
     "weights must be float32 or the values' dtype (Float), got Double", False),
    ("weights_int", dict(weights=torch.ones(3, 2, dtype=torch.int64)),
     "weights must be float32 or the values' dtype (Float), got Long", True),
    ("values_bf16_weights_fp16", dict(values=torch.randn(10, 4).bfloat16(), weights=torch.rand(3, 2).half()),
     "weights must be float32 or the values' dtype (BFloat16), got Half", False),
    ("no_rows", dict(values=torch.randn(0, 4)), "values has no rows but indices is not empty", False),
    ("indices_device", dict(indices=torch.zeros(3, 2, dtype=torch.long, device=META)),
     "values and indices must be on the same device, got cpu and meta", True),
    ("weights_device", dict(weights=torch.rand(3, 2, device=META)),
     "values and weights must be on the same device, got cpu and meta", True),
]


def _case(op, name, build, what):
    return pytest.param(op, build, f"memory.{op}: {what}", id=f"{op}-{name}")


CASES = [
    *[_case("embedding_bag", name, lambda kw=kw: eb(**kw), what) for name, kw, what, _ in EB_CASES],
    *[_case("embedding_bag_backward", name, lambda kw=kw: ebb(**kw), what) for name, kw, what, _ in EB_CASES],
    _case("embedding_bag_backward", "grad_shape", lambda: ebb(torch.randn(3, 5)),
          "grad_out must have shape (tokens, dim) = (3, 4), got [3, 5]"),
    _case("embedding_bag_backward", "grad_1d", lambda: ebb(torch.randn(12)),
          "grad_out must have shape (tokens, dim) = (3, 4), got [12]"),
    _case("embedding_bag_backward", "grad_int", lambda: ebb(torch.ones(3, 4, dtype=torch.int32)),
          "grad_out must be a floating dtype, got Int"),
    _case("embedding_bag_backward", "grad_device", lambda: ebb(torch.randn(3, 4, device=META)),
          "values and grad_out must be on the same device, got cpu and meta"),
    _case("rows_to_dense", "rows_float", lambda: r2d(rows=torch.arange(3.0)), "rows must be a 1-D int64 tensor, got 1-D Float"),
    _case("rows_to_dense", "rows_2d", lambda: r2d(rows=torch.arange(3).view(3, 1)),
          "rows must be a 1-D int64 tensor, got 2-D Long"),
    _case("rows_to_dense", "rows_grad_shape", lambda: r2d(rows_grad=torch.randn(4, 2)),
          "rows_grad must have shape (3, dim), got [4, 2]"),
    _case("rows_to_dense", "rows_grad_1d", lambda: r2d(rows_grad=torch.randn(3)), "rows_grad must have shape (3, dim), got [3]"),
    _case("rows_to_dense", "n_rows", lambda: r2d(n_rows=-1), "n_rows must be >= 0, got -1"),
    _case("rows_to_dense", "device", lambda: r2d(rows_grad=torch.randn(3, 2, device=META)),
          "rows and rows_grad must be on the same device, got cpu and meta"),
    _case("row_adam_", "param_1d", lambda: adam(param=torch.randn(40)),
          "param must be a contiguous 2-D tensor, got shape [40]"),
    _case("row_adam_", "param_strided", lambda: adam(param=torch.randn(4, 10).t()),
          "param must be a contiguous 2-D tensor, got shape [10, 4]"),
    _case("row_adam_", "param_int", lambda: adam(param=torch.ones(10, 4, dtype=torch.int64)),
          "param must be floating point, got Long"),
    _case("row_adam_", "exp_avg_fp64", lambda: adam(exp_avg=torch.zeros(10, 4, dtype=torch.float64)),
          "exp_avg and exp_avg_sq must be contiguous Float tensors of param's shape [10, 4], got Double [10, 4]"),
    _case("row_adam_", "exp_avg_sq_shape", lambda: adam(exp_avg_sq=torch.zeros(10, 3)),
          "exp_avg and exp_avg_sq must be contiguous Float tensors of param's shape [10, 4], got Float [10, 3]"),
    _case("row_adam_", "exp_avg_strided", lambda: adam(exp_avg=torch.zeros(4, 10).t()),
          "exp_avg and exp_avg_sq must be contiguous Float tensors of param's shape [10, 4], got Float [10, 4]"),
    _case("row_adam_", "bf16_moments",
          lambda: adam(param=torch.randn(10, 4).bfloat16(), exp_avg=torch.zeros(10, 4).bfloat16(),
                       rows_grad=torch.randn(3, 4).bfloat16()),
          "exp_avg and exp_avg_sq must be contiguous Float tensors of param's shape [10, 4], got BFloat16 [10, 4]"),
    _case("row_adam_", "fp64_moments",
          lambda: adam(param=torch.randn(10, 4).double(), exp_avg=torch.zeros(10, 4).double(),
                       rows_grad=torch.randn(3, 4).double()),
          "exp_avg and exp_avg_sq must be contiguous Double tensors of param's shape [10, 4], got Float [10, 4]"),
    _case("row_adam_", "state_device", lambda: adam(exp_avg_sq=torch.zeros(10, 4, device=META)),
          "param and optimizer state must be on the same device, got cpu and meta"),
    _case("row_adam_", "rows_int32", lambda: adam(rows=torch.tensor([1, 4, 7], dtype=torch.int32)),
          "rows must be a 1-D int64 tensor, got 1-D Int"),
    _case("row_adam_", "rows_grad_shape", lambda: adam(rows_grad=torch.randn(3, 5)),
          "rows_grad must have shape (3, 4), got [3, 5]"),
    _case("row_adam_", "rows_grad_count", lambda: adam(rows_grad=torch.randn(2, 4)),
          "rows_grad must have shape (3, 4), got [2, 4]"),
    _case("row_adam_", "rows_grad_dtype", lambda: adam(rows_grad=torch.randn(3, 4, dtype=torch.float64)),
          "rows_grad must have param's dtype Float, got Double"),
    _case("row_adam_", "rows_device", lambda: adam(rows=torch.tensor([1, 4, 7], device=META)),
          "param and rows must be on the same device, got cpu and meta"),
    _case("row_adam_", "rows_grad_device", lambda: adam(rows_grad=torch.randn(3, 4, device=META)),
          "param and rows_grad must be on the same device, got cpu and meta"),
    _case("row_adam_", "beta1", lambda: adam(beta1=1.0), "betas must be in [0, 1), got 1 and 0.999"),
    _case("row_adam_", "beta2", lambda: adam(beta2=-0.5), "betas must be in [0, 1), got 0.9 and -0.5"),
    _case("row_adam_", "beta2_rounds", lambda: adam(beta2=1.0000001), "betas must be in [0, 1), got 0.9 and 1"),
    _case("row_adam_", "step", lambda: adam(step=0), "step must be >= 1, got 0"),
    _case("row_adagrad_", "param_1d", lambda: adagrad(param=torch.randn(40)),
          "param must be a contiguous 2-D tensor, got shape [40]"),
    _case("row_adagrad_", "param_strided", lambda: adagrad(param=torch.randn(4, 10).t()),
          "param must be a contiguous 2-D tensor, got shape [10, 4]"),
    _case("row_adagrad_", "param_int", lambda: adagrad(param=torch.ones(10, 4, dtype=torch.int64)),
          "param must be float32, bfloat16, float16 or float64, got Long"),
    _case("row_adagrad_", "sum_sq_fp64", lambda: adagrad(sum_sq=torch.zeros(10, dtype=torch.float64)),
          "sum_sq must be Float (the accumulation dtype of Float params), got Double"),
    _case("row_adagrad_", "sum_sq_bf16",
          lambda: adagrad(param=torch.randn(10, 4).bfloat16(), sum_sq=torch.zeros(10).bfloat16(),
                          rows_grad=torch.randn(3, 4).bfloat16()),
          "sum_sq must be Float (the accumulation dtype of BFloat16 params), got BFloat16"),
    _case("row_adagrad_", "sum_sq_fp32_for_fp64",
          lambda: adagrad(param=torch.randn(10, 4).double(), rows_grad=torch.randn(3, 4).double()),
          "sum_sq must be Double (the accumulation dtype of Double params), got Float"),
    _case("row_adagrad_", "sum_sq_2d", lambda: adagrad(sum_sq=torch.zeros(10, 4)),
          "sum_sq must have shape [10] (one value per row of param), got [10, 4]"),
    _case("row_adagrad_", "sum_sq_short", lambda: adagrad(sum_sq=torch.zeros(9)),
          "sum_sq must have shape [10] (one value per row of param), got [9]"),
    _case("row_adagrad_", "sum_sq_scalar", lambda: adagrad(sum_sq=torch.zeros(())),
          "sum_sq must have shape [10] (one value per row of param), got []"),
    _case("row_adagrad_", "sum_sq_strided", lambda: adagrad(sum_sq=torch.zeros(20)[::2]),
          "sum_sq must be contiguous, got strides [2]"),
    _case("row_adagrad_", "sum_sq_device", lambda: adagrad(sum_sq=torch.zeros(10, device=META)),
          "param and sum_sq must be on the same device, got cpu and meta"),
    _case("row_adagrad_", "rows_int32", lambda: adagrad(rows=torch.tensor([1, 4, 7], dtype=torch.int32)),
          "rows must be a 1-D int64 tensor, got 1-D Int"),
    _case("row_adagrad_", "rows_2d", lambda: adagrad(rows=torch.tensor([[1, 4, 7]])),
          "rows must be a 1-D int64 tensor, got 2-D Long"),
    _case("row_adagrad_", "rows_grad_shape", lambda: adagrad(rows_grad=torch.randn(3, 5)),
          "rows_grad must have shape (3, 4), got [3, 5]"),
    _case("row_adagrad_", "rows_grad_count", lambda: adagrad(rows_grad=torch.randn(2, 4)),
          "rows_grad must have shape (3, 4), got [2, 4]"),
    _case("row_adagrad_", "rows_grad_1d", lambda: adagrad(rows_grad=torch.randn(12)),
          "rows_grad must have shape (3, 4), got [12]"),
    _case("row_adagrad_", "rows_grad_dtype", lambda: adagrad(rows_grad=torch.randn(3, 4).bfloat16()),
          "rows_grad must have param's dtype Float, got BFloat16"),
    _case("row_adagrad_", "rows_device", lambda: adagrad(rows=torch.tensor([1, 4, 7], device=META)),
          "param and rows must be on the same device, got cpu and meta"),
    _case("row_adagrad_", "rows_grad_device", lambda: adagrad(rows_grad=torch.randn(3, 4, device=META)),
          "param and rows_grad must be on the same device, got cpu and meta"),
    _case("row_adagrad_", "lr_negative", lambda: adagrad(lr=-0.1), "lr must be finite and >= 0, got -0.1"),
    _case("row_adagrad_", "lr_nan", lambda: adagrad(lr=float("nan")), "lr must be finite and >= 0, got nan"),
    _case("row_adagrad_", "lr_inf", lambda: adagrad(lr=float("inf")), "lr must be finite and >= 0, got inf"),
    _case("row_adagrad_", "eps_zero", lambda: adagrad(eps=0.0), "eps must be finite and > 0, got 0"),
    _case("row_adagrad_", "eps_negative", lambda: adagrad(eps=-1e-08), "eps must be finite and > 0, got -1e-08"),
    _case("row_adagrad_", "weight_decay_negative", lambda: adagrad(weight_decay=-0.01),
          "weight_decay must be finite and >= 0, got -0.01"),
    _case("pk_topk", "k0", lambda: pk(k=0), "k must be in [1, n_keys = 5], got 0"),
    _case("pk_topk", "k6", lambda: pk(k=6), "k must be in [1, n_keys = 5], got 6"),
    _case("pk_topk", "query_2d", lambda: pk(query=torch.randn(4, 8)),
          "query must be 3-D (tokens, heads, 2 * half), got shape [4, 8]"),
    _case("pk_topk", "keys_3d", lambda: pk(keys=torch.randn(2, 5, 4)),
          "keys must be 4-D (heads, 2, n_keys, half), got shape [2, 5, 4]"),
    _case("pk_topk", "keys_3_halves", lambda: pk(keys=torch.randn(2, 3, 5, 4)),
          "keys must be 4-D (heads, 2, n_keys, half), got shape [2, 3, 5, 4]"),
    _case("pk_topk", "odd_width", lambda: pk(query=torch.randn(4, 2, 7)), "query width must be even (two halves), got 7"),
    _case("pk_topk", "heads", lambda: pk(query=torch.randn(4, 3, 8)), "query has 3 heads but keys has 2"),
    _case("pk_topk", "half_width", lambda: pk(query=torch.randn(4, 2, 6)),
          "query half width 3 does not match the sub-key width 4"),
    _case("pk_topk", "dtypes", lambda: pk(query=torch.randn(4, 2, 8, dtype=torch.float64)),
          "query and keys must have the same dtype, got Double and Float"),
    _case("pk_topk", "int", lambda: pk(torch.ones(4, 2, 8, dtype=torch.int32), torch.ones(2, 2, 5, 4, dtype=torch.int32)),
          "query must be float32, bfloat16, float16 or float64, got Int"),
    _case("pk_topk", "device", lambda: pk(keys=torch.randn(2, 2, 5, 4, device=META)),
          "query and keys must be on the same device, got cpu and meta"),
]


def _message(err: BaseException) -> str:
    """The innermost message of an error chain (torch.compile wraps the fake kernel's error)."""
    while (inner := err.__cause__ or err.__context__) is not None:
        err = inner
    return str(err)


def _raised(fn, *args) -> str:
    with pytest.raises(RuntimeError) as info:
        fn(*args)
    return _message(info.value)


def _mixed_devices(args) -> bool:
    return len({a.device for a in args if isinstance(a, torch.Tensor)}) > 1


@pytest.mark.parametrize("op,build,message", CASES)
def test_kernel_rejects(op, build, message):
    # Mixed CPU and meta tensors dispatch to the meta (fake) kernel; with a GPU, the CUDA
    # test below sends them to the CUDA kernel instead.
    assert _raised(getattr(M, op), *build()) == message


@pytest.mark.parametrize("mode", ["fake_tensor", "meta", "compile", "compile_dynamic"])
@pytest.mark.parametrize("op,build,message", CASES)
def test_fake_kernel_rejects_alike(op, build, message, mode):
    fn, args = getattr(M, op), build()
    if mode == "fake_tensor":
        with FakeTensorMode() as fake:
            args = [fake.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            assert _raised(fn, *args) == message
    elif mode == "meta":
        if _mixed_devices(args):
            pytest.skip("all-meta inputs cannot be on two devices")
        metas = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
        if any(isinstance(a, torch.Tensor) and a.stride() != m.stride() for a, m in zip(args, metas, strict=True)):
            pytest.skip("a copy to meta makes a non-dense tensor contiguous")
        assert _raised(fn, *metas) == message
    else:
        torch._dynamo.reset()
        compiled = torch.compile(lambda *a: fn(*a), fullgraph=True, backend="eager", dynamic=mode == "compile_dynamic")
        assert _raised(compiled, *args) == message


def _on_cuda(a):
    # CPU tensors go to the GPU and meta ones become CPU tensors (zeros: valid indices).
    if not isinstance(a, torch.Tensor):
        return a
    if a.device.type == "meta":
        return torch.zeros(a.shape, dtype=a.dtype)
    return a.cuda()


@pytest.mark.parametrize("op,build,message", CASES)
def test_cuda_kernel_rejects_like_the_fake_kernel(op, build, message):
    # The CUDA kernels get the same checks; mixed-device cases become CUDA + CPU, where
    # the real kernel (not the meta one) answers.
    from conftest import CUDA_SKIP

    if CUDA_SKIP is not None:
        pytest.skip(CUDA_SKIP)
    args = [_on_cuda(a) for a in build()]
    with FakeTensorMode() as fake:
        fake_message = _raised(getattr(M, op), *[fake.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert _raised(getattr(M, op), *args) == fake_message
    if not _mixed_devices(build()):
        assert fake_message == message


@pytest.mark.parametrize(
    "query_shape,keys_shape",
    [((4, 2, 8), (2, 2, 65537, 4)), ((1, 65536, 2), (65536, 2, 1, 1)), ((1, 1, 2**25 + 2), (1, 2, 1, 2**24 + 1))],
)
def test_fake_pk_topk_has_no_cuda_limits(query_shape, keys_shape):
    # Shapes beyond the fused CUDA kernel (n_keys > 65536, heads > 65535, half > 2^24) go to
    # pk_topk_by_sorting on CUDA, so the fake kernel accepts them there as on the CPU.
    with FakeTensorMode():
        query, keys = torch.empty(query_shape, device="cuda"), torch.empty(keys_shape, device="cuda")
        scores, indices = M.pk_topk(query, keys, 1)
        assert scores.shape == indices.shape == (query_shape[0], query_shape[1], 1)


@pytest.mark.parametrize("op", ["embedding_bag", "embedding_bag_backward"])
def test_backward_limit_on_lookups(op):
    # Past 2^32 lookups the backward's 32-bit sort keys would overflow; meta tensors only.
    values = torch.empty(10, 4, device="meta")
    indices = torch.empty(2**16, 2**16, dtype=torch.int64, device="meta")
    weights = torch.empty(2**16, 2**16, device="meta")
    if op == "embedding_bag":
        assert M.embedding_bag(values, indices, weights).shape == (2**16, 4)
        return
    message = _raised(M.embedding_bag_backward, torch.empty(2**16, 4, device="meta"), values, indices, weights, True)
    assert message == (
        "memory.embedding_bag_backward: more than 2^32 lookups or rows are not supported, got 4294967296 lookups and 10 rows"
    )


def test_dynamic_compile_of_valid_calls_neither_fails_nor_recompiles():
    # Checks on symbolic sizes must hold symbolically: a dynamic graph through every op and
    # its backward (with the unbacked row count of embedding_bag_backward) traces once.
    def f(query, keys, values, weights):
        scores, idx = M.pk_topk(query, keys, 4)
        out = M.embedding_bag(values, idx.view(idx.shape[0], -1), scores.softmax(-1).view(idx.shape[0], -1) * weights)
        return out.square().sum()

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for tokens in (5, 9, 13):
        query = torch.randn(tokens, 2, 8, requires_grad=True)
        keys = torch.randn(2, 2, 6, 4, requires_grad=True)
        values = torch.randn(36, 3, requires_grad=True)
        weights = torch.rand(tokens, 8)
        got = compiled(query, keys, values, weights)
        got.backward()
        grads = [t.grad.clone() for t in (query, keys, values)]
        for t in (query, keys, values):
            t.grad = None
        want = f(query, keys, values, weights)
        want.backward()
        torch.testing.assert_close(got, want)
        for g, t in zip(grads, (query, keys, values), strict=True):
            torch.testing.assert_close(g, t.grad)
    assert counters["stats"]["unique_graphs"] == 1


def test_dtype_names_are_the_kernels():
    dtypes = {v for v in vars(torch).values() if isinstance(v, torch.dtype)}
    for dtype in sorted(dtypes, key=str):
        if dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64) or str(dtype).startswith(("torch.qint", "torch.quint")):
            continue  # accepted, or quantized (no plain tensors of them)
        try:
            with warnings.catch_warnings():  # "support is experimental" for a few dtypes
                warnings.simplefilter("ignore", UserWarning)
                query, keys = torch.empty(0, 1, 2, dtype=dtype), torch.empty(1, 2, 1, 1, dtype=dtype)
        except (RuntimeError, TypeError):
            continue
        message = _raised(M.pk_topk, query, keys, 1)
        assert message.endswith(f"got {dtype_name(dtype)}"), (dtype, message)


def test_accumulation_dtype():
    assert accumulation_dtype(torch.float64) == torch.float64
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert accumulation_dtype(dtype) == torch.float32
    assert ops.accumulation_dtype is accumulation_dtype
    assert M.pk_topk(torch.randn(2, 1, 4, dtype=torch.float64), torch.randn(1, 2, 3, 2, dtype=torch.float64), 2)[
        0
    ].dtype == accumulation_dtype(torch.float64)


@pytest.mark.parametrize("bad,where", [(-1, (0, 1)), (10, (2, 0)), (2**40, (1, 1))])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_out_of_range_index(bad, where, index_dtype):
    if index_dtype == torch.int32 and bad > 2**31:
        pytest.skip("not representable in int32")
    idx = torch.randint(0, 10, (3, 2)).to(index_dtype)
    idx[where] = bad
    msg = rf"memory.embedding_bag: index out of range: indices\[{where[0]}, {where[1]}\] = {bad} but values has 10 rows"
    with pytest.raises(RuntimeError, match=msg):
        ops.embedding_bag(torch.randn(10, 4), idx, torch.rand(3, 2))
    grad = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="memory.embedding_bag_backward: index out of range"):
        ops.embedding_bag_backward(grad, torch.randn(10, 4), idx, torch.rand(3, 2), True)


def test_rows_checked_by_the_cpu_kernels():
    # Data-dependent: only the real kernels check them; the fake kernels cannot.
    with pytest.raises(RuntimeError, match=r"memory.rows_to_dense: rows\[1\] = 7 is out of range for n_rows = 5"):
        M.rows_to_dense(torch.tensor([0, 7]), torch.randn(2, 3), 5)
    with pytest.raises(RuntimeError, match=r"memory.rows_to_dense: rows must be strictly ascending"):
        M.rows_to_dense(torch.tensor([3, 1]), torch.randn(2, 3), 5)
    with pytest.raises(RuntimeError, match=r"memory.row_adam_: rows must be strictly ascending"):
        M.row_adam_(*adam(rows=torch.tensor([4, 4, 7])))
    with pytest.raises(RuntimeError, match=r"memory.row_adam_: rows\[2\] = 10 is out of range for a table of 10 rows"):
        M.row_adam_(*adam(rows=torch.tensor([1, 4, 10])))
    with pytest.raises(RuntimeError, match=r"memory.row_adagrad_: rows must be strictly ascending"):
        M.row_adagrad_(*adagrad(rows=torch.tensor([4, 4, 7])))
    with pytest.raises(RuntimeError, match=r"memory.row_adagrad_: rows\[2\] = 10 is out of range for a table of 10 rows"):
        M.row_adagrad_(*adagrad(rows=torch.tensor([1, 4, 10])))


# ---------------------------------------------------------------------------------------
# The sharded lookup in one process (a world of one): the same checks, reported per rank.


@pytest.fixture
def sharded_table():
    import torch.distributed as dist

    from memory_ext import distributed as md

    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield md.ShardedValues(10, 4, seed=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "kwargs,what", [pytest.param(kw, what, id=name) for name, kw, what, sharded in EB_CASES if sharded]
)
def test_sharded_lookup_rejects_alike(sharded_table, kwargs, what):
    from memory_ext import distributed as md

    _, indices, weights = eb(**kwargs)
    with pytest.raises(ValueError, match=re.escape(f"memory.sharded_lookup: group rank 0: {what}")) as info:
        md.sharded_lookup(sharded_table, indices, weights)
    assert str(info.value) == f"memory.sharded_lookup: group rank 0: {what}"
    # The group is still usable after the error.
    _, indices, weights = eb()
    assert md.sharded_lookup(sharded_table, indices, weights).shape == (3, 4)


@pytest.mark.parametrize("weights_dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_sharded_lookup_takes_any_floating_weights(sharded_table, weights_dtype):
    from memory_ext import distributed as md

    _, indices, weights = eb()
    weights = weights.to(weights_dtype)
    got = md.sharded_lookup(sharded_table, indices, weights)
    want = ops.embedding_bag(sharded_table.weight.detach(), indices, weights.float())
    torch.testing.assert_close(got, want)

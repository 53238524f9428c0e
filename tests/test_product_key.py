"""ProductKeyMemory against a plain-PyTorch layer that scores all n_keys^2 keys, plus shapes,
dtypes, autocast, torch.compile, initialisation and errors."""
import pytest
import torch
import torch.nn.functional as F

from memory_ext import MemoryValues, ProductKeyMemory


def reference_forward(layer: ProductKeyMemory, x: torch.Tensor) -> torch.Tensor:
    """The layer written out plainly: every key is concat(K1[i], K2[j]), full scores, topk."""
    heads, n_keys, k, k_dim = layer.heads, layer.n_keys, layer.k, layer.k_dim
    half = k_dim // 2
    flat = x.reshape(-1, layer.dim)
    q = (flat @ layer.query.weight.T + layer.query.bias).view(-1, heads, 2, half)
    keys = layer.keys
    if layer.query_gain is not None:
        q = q / q.pow(2).mean(-1, keepdim=True).add(torch.finfo(q.dtype).eps).sqrt()
        q = q * layer.query_gain * k_dim**-0.5
        keys = keys / keys.pow(2).mean(-1, keepdim=True).add(torch.finfo(keys.dtype).eps).sqrt()
    full_keys = torch.cat(  # (heads, n_keys * n_keys, k_dim), row i * n_keys + j
        (keys[:, 0].unsqueeze(2).expand(-1, -1, n_keys, -1), keys[:, 1].unsqueeze(1).expand(-1, n_keys, -1, -1)),
        dim=-1,
    ).reshape(heads, n_keys * n_keys, k_dim)
    scores = torch.einsum("thd,hnd->thn", q.reshape(-1, heads, k_dim), full_keys)
    top, idx = scores.topk(k, dim=-1)
    w = top.softmax(-1)
    y = (layer.values.weight[idx] * w.unsqueeze(-1)).sum((1, 2))
    if layer.gate is not None:
        y = F.linear(y * F.silu(F.linear(flat, layer.gate.weight, layer.gate.bias)), layer.out.weight, layer.out.bias)
    return y.view(x.shape)


def make(dim=32, n_keys=16, heads=3, k=5, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    kw.setdefault("value_dtype", dtype)
    layer = ProductKeyMemory(dim, n_keys=n_keys, heads=heads, k=k, dtype=dtype, **kw)
    with torch.no_grad():  # non-zero biases and gains so the reference checks them too
        for name, p in layer.named_parameters():
            if name.endswith("bias") or name == "query_gain":
                p.uniform_(-0.5, 1.5)
    return layer


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("swilu", [True, False])
@pytest.mark.parametrize("k_dim", [None, 6])
def test_matches_full_score_reference(qk_norm, swilu, k_dim):
    layer = make(qk_norm=qk_norm, swilu=swilu, k_dim=k_dim)
    x = torch.randn(4, 7, 32, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    x_ref = x.detach().clone().requires_grad_()
    ref = reference_forward(layer, x_ref)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    params = [p for _, p in layer.named_parameters()]
    got = torch.autograd.grad(out, [x, *params], grad)
    want = torch.autograd.grad(ref, [x_ref, *params], grad)
    for name, g, w in zip(["x"] + [n for n, _ in layer.named_parameters()], got, want, strict=True):
        torch.testing.assert_close(g, w, msg=name)


def test_float32_matches_reference():
    layer = make(dtype=torch.float32)
    x = torch.randn(50, 32)
    torch.testing.assert_close(layer(x), reference_forward(layer, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(32,), (0, 32), (5, 32), (2, 3, 4, 32)])
def test_any_leading_shape(shape):
    layer = make(dtype=torch.float32)
    x = torch.randn(shape)
    out = layer(x)
    assert out.shape == shape and out.dtype == torch.float32
    if x.numel():
        torch.testing.assert_close(out.reshape(-1, 32), layer(x.reshape(-1, 32)))


def test_gradient_reaches_every_parameter():
    layer = make(dtype=torch.float32)
    layer(torch.randn(64, 32)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_lookup_shapes_and_softmax():
    layer = make(dtype=torch.float32)
    idx, w = layer.lookup(torch.randn(6, 32))
    assert idx.shape == w.shape == (6, 3 * 5) and idx.dtype == torch.int64 and w.dtype == torch.float32
    assert ((idx >= 0) & (idx < 16 * 16)).all()
    torch.testing.assert_close(w.view(6, 3, 5).sum(-1), torch.ones(6, 3))


def test_bf16_autocast_and_bf16_values():
    layer = make(dtype=torch.float32, value_dtype=torch.bfloat16)
    assert layer.values.weight.dtype == torch.bfloat16
    x = torch.randn(3, 9, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    out.float().square().sum().backward()
    assert layer.keys.grad.dtype == torch.float32 and layer.values.weight.grad.dtype == torch.bfloat16
    plain = layer(x)
    torch.testing.assert_close(out.float(), plain, atol=0.1, rtol=0.1)


def test_torch_compile_fullgraph():
    layer = make(dtype=torch.float32)
    x = torch.randn(2, 11, 32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, layer(x))
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    layer(x).sum().backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)


def test_initialisation_follows_the_paper():
    torch.manual_seed(0)
    dim, k_dim = 256, 64
    layer = ProductKeyMemory(dim, n_keys=64, heads=4, k=8, k_dim=k_dim)
    assert layer.keys.abs().max() <= k_dim**-0.5 and layer.keys.abs().max() > 0.9 * k_dim**-0.5
    bound = (6 / (dim + 4 * k_dim)) ** 0.5  # xavier-uniform
    assert layer.query.weight.abs().max() <= bound and layer.query.weight.abs().max() > 0.9 * bound
    for lin in (layer.gate, layer.out):
        assert abs(lin.weight.std().item() - dim**-0.5) < 0.05 * dim**-0.5
        assert torch.count_nonzero(lin.bias) == 0
    assert torch.count_nonzero(layer.query.bias) == 0 and torch.equal(layer.query_gain, torch.ones(4, 2, 32))
    assert abs(layer.values.weight.std().item() - dim**-0.5) < 0.05 * dim**-0.5
    assert layer.k_dim == k_dim and ProductKeyMemory(dim, n_keys=8, k=4).k_dim == dim // 2


def test_shared_values_and_errors():
    pool = MemoryValues(64, 20)
    a = ProductKeyMemory(16, n_keys=8, k=4, values=pool)
    b = ProductKeyMemory(16, n_keys=8, k=4, values=pool)
    assert a.values is b.values and a.k_dim == 10 and a.out.in_features == 20
    assert a(torch.randn(3, 16)).shape == (3, 16)
    with pytest.raises(ValueError, match="n_keys\\^2 = 100 rows, got 64"):
        ProductKeyMemory(16, n_keys=10, values=pool, k=4)
    with pytest.raises(ValueError, match="k_dim must be even"):
        ProductKeyMemory(16, n_keys=8, k=4, k_dim=7)
    with pytest.raises(ValueError, match="k must be in"):
        ProductKeyMemory(16, n_keys=8, k=9)
    with pytest.raises(ValueError, match="without swilu the value dim must equal dim 16, got 20"):
        ProductKeyMemory(16, n_keys=8, k=4, values=pool, swilu=False)

"""ProductKeyMemory under bf16 autocast on the CPU, under torch.compile with the inductor
backend and dynamic token counts, and called from several Python threads at once.

- autocast: against the same layer written in plain PyTorch under the same autocast
  context, with the two library ops (which do not autocast) replaced by their float32
  equivalents: the same selected rows, outputs and gradients within bf16 rounding.
- inductor: forward and backward with dynamic=True over a few token counts (one compile
  serves them all), equal to eager within float32 reordering.
- threads: one shared layer run concurrently on separate inputs, under no_grad and with
  autograd.grad, gives bit for bit what sequential runs give.
"""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from memory_ext import ProductKeyMemory


def make_layer(seed=0, value_dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    kw.setdefault("n_keys", 16)
    kw.setdefault("heads", 2)
    kw.setdefault("k", 4)
    layer = ProductKeyMemory(32, value_dtype=value_dtype, **kw)
    with torch.no_grad():  # non-zero biases and gains, so that they are checked too
        for name, p in layer.named_parameters():
            if name.endswith("bias") or name == "query_gain":
                p.uniform_(-0.5, 1.5)
    return layer


# ---------------------------------------------------------------------------------------
# Autocast.


def plain_forward(layer, x):
    """ProductKeyMemory.forward in plain PyTorch: the same module calls and casts, the
    product-key top-k as a float32 top-k over all n_keys^2 pairs, the bag as a float32
    weighted sum rounded to the table's dtype. Returns (output, indices)."""
    heads, k, half = layer.heads, layer.k, layer.k_dim // 2
    flat = x.reshape(-1, layer.dim)
    tokens = flat.shape[0]
    query = layer.query(flat).to(layer.keys.dtype).view(tokens, heads, 2, half)
    keys = layer.keys
    query = F.rms_norm(query, (half,)) * (layer.query_gain * layer.k_dim**-0.5)
    keys = F.rms_norm(keys, (half,))
    query, keys = query.to(layer.keys.dtype), keys.to(layer.keys.dtype)
    with torch.autocast("cpu", enabled=False):  # pk_topk scores in float32 whatever the context
        s1 = torch.einsum("thd,hnd->thn", query[:, :, 0].float(), keys[:, 0].float())
        s2 = torch.einsum("thd,hnd->thn", query[:, :, 1].float(), keys[:, 1].float())
        full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)
        scores, indices = full.topk(k, dim=-1)
        weights = torch.softmax(scores, dim=-1).view(tokens, heads * k)
        indices = indices.view(tokens, heads * k)
        table = layer.values.weight
        y = (table[indices].float() * weights.unsqueeze(-1)).sum(1).to(table.dtype)
    return layer.out(y * F.silu(layer.gate(flat))).view(x.shape), indices


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bf16_autocast_matches_plain_pytorch(value_dtype):
    layer = make_layer(value_dtype=value_dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 32, generator=g)
    grad = torch.randn(3, 7, 32, generator=g)
    params = [p for _, p in layer.named_parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        indices, _ = layer.lookup(x.reshape(-1, 32))
        want, want_indices = plain_forward(layer, x)
    assert out.dtype == want.dtype == torch.bfloat16
    assert torch.equal(indices, want_indices), "autocast changed which rows are read"
    # Same casts: only float32 summation orders differ, and the bf16 rounding hides them
    # nearly always; scoring in bf16 (an op that autocasts) changes many elements.
    differs = out != want
    assert differs.float().mean().item() <= 0.01, f"{int(differs.sum())} of {differs.numel()} elements differ"
    torch.testing.assert_close(out, want, rtol=2**-7, atol=0)  # and those by one bf16 step at most
    got_grads = torch.autograd.grad(out, params, grad)
    want_grads = torch.autograd.grad(want, params, grad)
    for (name, p), a, b in zip(layer.named_parameters(), got_grads, want_grads, strict=True):
        assert a.dtype == b.dtype == p.dtype, name
        scale = b.abs().max().item() + 1e-6
        torch.testing.assert_close(a.float() / scale, b.float() / scale, atol=2e-2, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------
# torch.compile with inductor.


def test_inductor_dynamic_tokens_forward_and_backward():
    # Kept to one small graph (no SwiLU output): inductor compiles C++ for every kernel,
    # which dominates this test's time on a small CPU machine.
    layer = make_layer(seed=2, swilu=False)
    compiled = torch.compile(layer, backend="inductor", dynamic=True, fullgraph=True)
    params = list(layer.parameters())
    for tokens in (5, 9, 20):
        g = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, 32, generator=g)
        grad = torch.randn(tokens, 32, generator=g)
        out = compiled(x)
        want = layer(x)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        got_grads = torch.autograd.grad(out, params, grad)
        want_grads = torch.autograd.grad(want, params, grad)
        for name_p, a, b in zip(layer.named_parameters(), got_grads, want_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name_p[0])


# ---------------------------------------------------------------------------------------
# Python threads sharing one layer.


def run_concurrently(fn, inputs):
    results = [None] * len(inputs)
    errors = []
    start = threading.Barrier(len(inputs))

    def work(i):
        try:
            start.wait()
            for _ in range(3):  # several rounds, so that the calls overlap
                results[i] = fn(inputs[i])
        except BaseException as e:  # noqa: B036 (re-raised in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_threads_sharing_a_layer_match_sequential_runs(value_dtype):
    # Large enough that each call runs parallel kernels (several token blocks, a long
    # backward) while the other threads run theirs.
    layer = make_layer(seed=3, value_dtype=value_dtype, n_keys=64, heads=4, k=16)
    params = list(layer.parameters())
    g = torch.Generator().manual_seed(4)
    inputs = [torch.randn(300 + 37 * i, 32, generator=g) for i in range(4)]

    def infer(x):
        with torch.no_grad():
            return (layer(x),)

    def train(x):
        out = layer(x)
        return (out, *torch.autograd.grad(out.square().sum(), params))

    for fn in (infer, train):
        sequential = [fn(x) for x in inputs]
        concurrent = run_concurrently(fn, inputs)
        for i, (a, b) in enumerate(zip(sequential, concurrent, strict=True)):
            for j, (u, v) in enumerate(zip(a, b, strict=True)):
                assert torch.equal(u, v), f"{fn.__name__}: input {i}, output {j} differs"

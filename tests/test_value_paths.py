"""The three training paths of a value table (dense, sparse, fused) and the recipe that picks them.

- fused update-in-backward is bitwise "sparse gradient, then the same optimizer" (same rows,
  same formula), for a pool shared by several layers and with the values clipped;
- param_groups + value_optimizer put the tables on the sparse path; a plain torch optimizer
  over model.parameters() still trains them densely;
- torch.compile of a model with sparse or fused tables trains as eager does, the lookup
  being the only part left to eager mode;
- wrong combinations of tables and optimizers raise errors that say what to do.
"""
from __future__ import annotations

import pytest
import torch

from memory_ext import MemoryValues, ProductKeyMemory
from memory_ext.nn import (
    SparseRowAdam,
    clip_grad_norms,
    param_groups,
    value_optimizer,
)

DIM = 24


def shared_layers(seed=0, dtype=torch.float32, n_layers=3):
    torch.manual_seed(seed)
    pool = MemoryValues(16 * 16, DIM, dtype=dtype)
    return torch.nn.ModuleList(
        ProductKeyMemory(DIM, n_keys=16, heads=2, k=4, values=pool) for _ in range(n_layers)
    )


def loss_of(layers, x):
    for layer in layers:
        x = x + layer(x).float()
    return x.square().mean()


def batch(step):
    return torch.randn(5, 7, DIM, generator=torch.Generator().manual_seed(100 + step))


def train(layers, optimizers, steps, clip=True):
    for step in range(steps):
        loss_of(layers, batch(step)).backward()
        if clip:
            clip_grad_norms(layers, 1.0)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)


def pool_of(layers):
    return layers[0].values


@pytest.mark.parametrize("rule", ["adam", "adagrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_layers", [1, 3])
def test_fused_is_bitwise_sparse_then_step(rule, dtype, n_layers):
    sparse, fused = shared_layers(dtype=dtype, n_layers=n_layers), shared_layers(dtype=dtype, n_layers=n_layers)
    opts_s = [torch.optim.AdamW(param_groups(sparse, 1e-2)), value_optimizer(sparse, 1e-2, rule=rule)]
    opts_f = [torch.optim.AdamW(param_groups(fused, 1e-2)),
              value_optimizer(fused, 1e-2, rule=rule, fused=True, max_norm=1.0)]
    for step in range(4):
        train(sparse, opts_s, 1)
        train(fused, opts_f, 1)
        assert pool_of(fused).weight.grad is None, "the fused path stores no gradient"
        for (name, a), b in zip(sparse.named_parameters(), fused.parameters(), strict=True):
            assert torch.equal(a, b), f"step {step}: {name} differs by {(a.float() - b.float()).abs().max()}"
    before = pool_of(sparse).weight.detach().clone()
    assert not torch.equal(before, shared_layers(dtype=dtype)[0].values.weight), "the values must train"
    # Both optimizers hold the same state, saved and loaded alike.
    state_s, state_f = opts_s[1].state_dict()["state"], opts_f[1].state_dict()["state"]
    assert state_s.keys() == state_f.keys()
    for key in state_s:
        for name, value in state_s[key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_f[key][name])), name


def test_fused_clipping_scales_like_clip_grad_norms():
    layers = shared_layers()
    opt = value_optimizer(layers, 1e-2, fused=True, max_norm=1e-3)
    loss_of(layers, batch(0)).backward()
    link = pool_of(layers).fused
    assert link.last_norm is not None and link.last_norm > 1e-3, "the test must actually clip"
    # Same norm as the stored sparse gradient would have.
    again = shared_layers()
    value_optimizer(again, 1e-2)
    loss_of(again, batch(0)).backward()
    _, norm = clip_grad_norms(again, 1.0)
    assert torch.equal(link.last_norm, norm)
    assert opt.state_dict()["state"][0]["step"] == 1


def test_fused_updates_once_per_backward_pass_and_forgets_a_failed_one():
    layers = shared_layers()
    opt = value_optimizer(layers, 1e-2, fused=True)
    x = batch(0).requires_grad_(True)

    def fail(_):
        raise RuntimeError("a failure later in the backward pass")

    out = loss_of(layers, x)
    x.register_hook(fail)  # runs after every memory layer's backward: the pass fails after the reads
    with pytest.raises(RuntimeError, match="a failure later"):
        out.backward()
    assert opt.state_dict()["state"] == {}, "a failed pass must not update"
    loss_of(layers, batch(1)).backward()
    reference = shared_layers()
    ref_opt = value_optimizer(reference, 1e-2)
    loss_of(reference, batch(1)).backward()
    ref_opt.step()
    assert torch.equal(pool_of(layers).weight, pool_of(reference).weight), "only the second pass's rows"
    assert opt.state_dict()["state"][0]["step"] == 1


def test_recipe_puts_the_values_on_the_sparse_path():
    layers = shared_layers()
    groups = param_groups(layers, 1e-3)
    assert "values" not in [g["name"] for g in groups]
    assert pool_of(layers).sparse_grad
    opt = value_optimizer(layers, 1e-3)
    assert isinstance(opt, SparseRowAdam) and opt.param_groups[0]["lr"] == pytest.approx(1e-2)
    loss_of(layers, batch(0)).backward()
    assert pool_of(layers).weight.grad.is_sparse


def test_plain_adamw_over_all_parameters_trains_densely():
    layers = shared_layers()
    before = pool_of(layers).weight.detach().clone()
    opt = torch.optim.AdamW(layers.parameters(), lr=1e-2)
    loss_of(layers, batch(0)).backward()
    assert not pool_of(layers).weight.grad.is_sparse
    opt.step()
    assert not torch.equal(before, pool_of(layers).weight)


def test_dense_values_group_on_request():
    layers = shared_layers()
    value_optimizer(layers, 1e-3)  # switches to sparse ...
    groups = param_groups(layers, 1e-3, values="dense")  # ... and back
    assert [g["name"] for g in groups][-1] == "values" and not pool_of(layers).sparse_grad


def test_error_fused_table_in_a_dense_optimizer():
    layers = shared_layers()
    value_optimizer(layers, 1e-3, fused=True)
    dense = torch.optim.AdamW(layers.parameters())
    loss_of(layers, batch(0)).backward()
    with pytest.raises(ValueError, match="AdamW: a value table .* is updated in its own backward by a fused SparseRowAdam"):
        dense.step()


def test_error_sparse_table_in_a_dense_optimizer():
    layers = shared_layers()
    pool_of(layers).sparse_grad = True
    dense = torch.optim.SGD(layers.parameters(), lr=0.1)
    loss_of(layers, batch(0)).backward()
    with pytest.raises(ValueError, match="SGD: a value table .* has a sparse gradient.*value_optimizer"):
        dense.step()


def test_error_values_left_out_but_never_stepped():
    layers = shared_layers()
    dense = torch.optim.AdamW(param_groups(layers, 1e-3))
    loss_of(layers, batch(0)).backward()
    with pytest.raises(ValueError, match="no row optimizer steps it.*value_optimizer"):
        dense.step()
    other = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    other.step()  # an unrelated optimizer is not concerned


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: value_optimizer(m, 1e-3, rule="sgd"), "value_optimizer: unknown rule 'sgd'"),
        (lambda m: value_optimizer(m, 1e-3, max_norm=1.0), "max_norm applies to the fused path only"),
        (lambda m: value_optimizer(m, 1e-3, fused=True, max_norm=0.0), "max_norm must be positive"),
        (lambda m: param_groups(m, 1e-3, values="both"), "param_groups: values must be 'sparse' or 'dense'"),
        (lambda m: pool_of(m).fuse(torch.optim.AdamW(pool_of(m).parameters())), "must be a memory_ext.nn.RowOptimizer"),
        (lambda m: pool_of(m).fuse(SparseRowAdam([torch.nn.Parameter(torch.zeros(3, 3))])), "is not one of this optimizer"),
        (lambda m: SparseRowAdam([torch.nn.Parameter(torch.zeros(3))]), "SparseRowAdam: parameters must be 2-D tables"),
    ],
)
def test_bad_combinations_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call(shared_layers())


def test_fused_refused_after_dense_values_requested():
    layers = shared_layers()
    value_optimizer(layers, 1e-3, fused=True)
    with pytest.raises(ValueError, match="values='dense' but a table is fused"):
        param_groups(layers, 1e-3, values="dense")
    pool_of(layers).unfuse()
    param_groups(layers, 1e-3, values="dense")


# ---------------------------------------------------------------------------------------
# torch.compile


def compiled_training(path, backend):
    """Three steps of a two-layer model, compiled or not; the parameters after them."""
    layers = shared_layers(n_layers=2)
    fused = path == "fused"
    opts = [torch.optim.AdamW(param_groups(layers, 1e-2)),
            value_optimizer(layers, 1e-2, fused=fused, max_norm=1.0 if fused else None)]
    step_fn = (lambda x: loss_of(layers, x)) if backend is None else torch.compile(
        lambda x: loss_of(layers, x), backend=backend, dynamic=False
    )
    for step in range(3):
        step_fn(batch(step)).backward()
        clip_grad_norms(layers, 1.0)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in layers.parameters()]


@pytest.mark.parametrize("path", ["sparse", "fused"])
def test_compiled_training_matches_eager(path):
    torch._dynamo.reset()
    eager = compiled_training(path, None)
    # aot_eager runs the same kernels as eager, but its traced backward (one graph: every
    # gradient of the step has a static size) may add a tensor's gradient contributions in
    # another order than eager autograd: rounding-level differences only.
    for a, b in zip(eager, compiled_training(path, "aot_eager"), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # inductor generates its own kernels for the parts around the lookup: float32 reordering only.
    for a, b in zip(eager, compiled_training(path, "inductor"), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["sparse", "fused"])
def test_only_the_lookup_runs_eagerly_under_compile(path):
    torch._dynamo.reset()
    layers = shared_layers(n_layers=2)
    value_optimizer(layers, 1e-2, fused=path == "fused")
    explain = torch._dynamo.explain(lambda x: loss_of(layers, x))(batch(0))
    # Every break is at the disabled lookup (one per lookup); everything else is in graphs.
    reasons = [r.reason for r in explain.break_reasons]
    assert len(reasons) == 2, reasons
    assert all("_lookup_off_dense" in r for r in reasons), reasons

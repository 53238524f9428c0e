"""Checkpoint resume: a run saved after some steps and loaded into freshly built objects
continues bit for bit like the uninterrupted run.

The model is the realistic one for a big table: two ProductKeyMemory layers sharing one
bf16 MemoryValues pool with sparse row gradients, trained by AdamW over
``param_groups(model, lr)`` (everything but the pool) and ``value_optimizer``
(SparseRowAdam, float32 moments for the bf16 table), with the paper's separate clipping.
The checkpoint goes through ``torch.save`` and ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import io

import torch
from torch import nn

from memory_ext import MemoryValues, ProductKeyMemory
from memory_ext.nn import clip_grad_norms, param_groups, value_optimizer

DIM, N_KEYS, LR = 24, 16, 1e-2
STEPS_BEFORE, STEPS_AFTER = 3, 3


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = MemoryValues(N_KEYS * N_KEYS, DIM, dtype=torch.bfloat16, sparse_grad=True)
        self.mem = nn.ModuleList(ProductKeyMemory(DIM, n_keys=N_KEYS, heads=2, k=4, values=self.pool) for _ in range(2))
        self.head = nn.Linear(DIM, DIM)

    def forward(self, x):
        for layer in self.mem:
            x = x + layer(x).float()
        return self.head(x)


def build(seed):
    torch.manual_seed(seed)
    model = TwoLayers()
    dense = torch.optim.AdamW(param_groups(model, LR), lr=LR, betas=(0.9, 0.95))
    sparse = value_optimizer(model, LR)
    return model, dense, sparse


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(6, 5, DIM, generator=g), torch.randn(6, 5, DIM, generator=g)


def train(model, dense, sparse, steps):
    for step in steps:
        x, target = batch(step)
        loss = (model(x) - target).square().mean()
        dense.zero_grad(set_to_none=True)
        sparse.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norms(model, max_norm=1.0)
        dense.step()
        sparse.step()


def snapshot(model, dense, sparse):
    """Every parameter and every optimizer state tensor, cloned."""
    out = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters()}
    for name, opt in (("dense", dense), ("sparse", sparse)):
        for i, state in enumerate(opt.state.values()):
            for key, value in state.items():
                out[f"{name}.{i}.{key}"] = value.clone() if torch.is_tensor(value) else torch.tensor(value)
    return out


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key} differs"


def test_resume_through_torch_save_is_bitwise_the_uninterrupted_run():
    straight = build(seed=0)
    train(*straight, range(STEPS_BEFORE))
    at_checkpoint = snapshot(*straight)
    train(*straight, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))

    first = build(seed=0)
    train(*first, range(STEPS_BEFORE))
    model, dense, sparse = first
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "dense": dense.state_dict(), "sparse": sparse.state_dict()}, buffer)
    del first, model, dense, sparse

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = build(seed=123)  # other initial values: everything must come from the checkpoint
    model, dense, sparse = resumed
    model.load_state_dict(checkpoint["model"])
    dense.load_state_dict(checkpoint["dense"])
    sparse.load_state_dict(checkpoint["sparse"])
    # The pool is one table in the fresh model too, its moments still float32.
    assert model.mem[0].values.weight is model.mem[1].values.weight is model.pool.weight
    moments = sparse.state[model.pool.weight]
    assert moments["exp_avg"].dtype == moments["exp_avg_sq"].dtype == torch.float32
    assert model.pool.weight.dtype == torch.bfloat16
    train(*resumed, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))

    final = snapshot(*straight)
    assert_bitwise_equal(snapshot(*resumed), final)
    # Not vacuous: the steps after the checkpoint moved the pool and the dense parameters.
    assert not torch.equal(at_checkpoint["param.pool.weight"], final["param.pool.weight"])
    assert not torch.equal(at_checkpoint["param.head.weight"], final["param.head.weight"])
    assert not torch.equal(at_checkpoint["sparse.0.exp_avg"], final["sparse.0.exp_avg"])

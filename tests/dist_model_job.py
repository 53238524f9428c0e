"""Job of the model-level test: a small memory model trained with memory parallelism 2.

Both ranks form one memory group; the model's other parameters are data-parallel (DDP)
and the shared value table is column-sharded with average_grads, so one step (gradient
clipping included) equals a step of the unsharded model on both ranks' batches with the
mean loss. The unsharded model is the same architecture in plain PyTorch (full pair
scores, torch.topk, a gathered weighted sum, torch's clip_grad_norm_), started from the
layers' initial parameters; float32 on both sides, so the comparison has a float32
tolerance, not a bitwise one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import memory_ext
from memory_ext import distributed as md

from dist_harness import case

VOCAB, DIM, N_KEYS, HEADS, K, TOKENS, STEPS, LR = 50, 16, 6, 2, 4, 24, 4, 1.0
CLIP = 1.0  # gradient clipping of both models, values and the rest apart


class TinyMemoryModel(nn.Module):
    """Embedding -> residual ProductKeyMemory layers sharing one value pool -> logits."""

    def __init__(self, process_group=None):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.values = memory_ext.MemoryValues(N_KEYS * N_KEYS, DIM, process_group=process_group)
        self.memories = nn.ModuleList(
            memory_ext.ProductKeyMemory(DIM, n_keys=N_KEYS, heads=HEADS, k=K, values=self.values) for _ in range(2)
        )
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        for memory in self.memories:
            x = x + memory(x)
        return self.head(x)


class PlainValues(nn.Module):
    """The value table in plain PyTorch: a weighted bag of rows."""

    def __init__(self, n_rows, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_rows, dim))

    def forward(self, indices, weights):
        return (self.weight[indices] * weights.unsqueeze(-1)).sum(1)


class PlainProductKeyMemory(nn.Module):
    """ProductKeyMemory's forward (qk_norm, swilu) in plain PyTorch: full pair scores and torch.topk."""

    def __init__(self, values, heads=HEADS, k=K, n_keys=N_KEYS):
        super().__init__()
        self.heads, self.k, self.k_dim = heads, k, DIM // 2
        half = self.k_dim // 2
        self.values = values
        self.query = nn.Linear(DIM, heads * self.k_dim)
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, half))
        self.query_gain = nn.Parameter(torch.empty(heads, 2, half))
        self.gate = nn.Linear(DIM, DIM)
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, DIM)
        half = self.k_dim // 2
        query = self.query(x).view(-1, self.heads, 2, half)
        query = F.rms_norm(query, (half,)) * (self.query_gain * self.k_dim**-0.5)
        keys = F.rms_norm(self.keys, (half,))
        s1 = torch.einsum("thd,hnd->thn", query[:, :, 0], keys[:, 0])
        s2 = torch.einsum("thd,hnd->thn", query[:, :, 1], keys[:, 1])
        scores, indices = (s1[..., :, None] + s2[..., None, :]).flatten(2).topk(self.k, dim=-1)
        weights = torch.softmax(scores, dim=-1)
        y = self.values(indices.flatten(1), weights.flatten(1))
        return self.out(y * F.silu(self.gate(x))).view(shape)


class PlainMemoryModel(TinyMemoryModel):
    """TinyMemoryModel in plain PyTorch, the reference of the sharded one (same state_dict keys
    and forward; only the layers differ)."""

    def __init__(self):
        nn.Module.__init__(self)  # not TinyMemoryModel's: it would build memory_ext layers
        self.embed = nn.Embedding(VOCAB, DIM)
        self.values = PlainValues(N_KEYS * N_KEYS, DIM)
        self.memories = nn.ModuleList(PlainProductKeyMemory(self.values) for _ in range(2))
        self.head = nn.Linear(DIM, VOCAB)


def plain_clip_(model, max_norm):
    """clip_grad_norms in plain PyTorch: the value table and the other parameters clipped apart."""
    values = [model.values.weight]
    others = [p for p in model.parameters() if p is not model.values.weight]
    other_norm = torch.nn.utils.clip_grad_norm_(others, max_norm)
    values_norm = torch.nn.utils.clip_grad_norm_(values, max_norm)
    return other_norm, values_norm


def model_job(rank, world, results):
    """Train the sharded model and the unsharded one side by side; losses and tables must agree."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    initial = TinyMemoryModel().state_dict()  # the layers' init; the reference computes in plain PyTorch
    reference = PlainMemoryModel()
    reference.load_state_dict(initial)
    sharded = TinyMemoryModel(process_group=dist.group.WORLD)
    with case(results, "model/values_match"):
        assert type(sharded.values) is md.ShardedValues and isinstance(sharded.values, memory_ext.MemoryValues)
        sharded.load_state_dict(initial)  # the plain full table is split on load
        sharded.values.memory_shard.average_grads = True
        assert torch.equal(md.full_table(sharded.values), reference.values.weight)

    g = torch.Generator().manual_seed(1)
    # One batch, seen every step: the loss must fall, so the comparison covers real updates.
    batches = [torch.randint(0, VOCAB, (world, TOKENS + 1), generator=g)] * STEPS
    md.exclude_from_ddp(sharded)
    ddp = DDP(sharded)
    # Plain SGD: unlike Adam, its step depends on the gradient's scale, so a wrong
    # value-gradient factor (sum instead of mean over the group) shows in the loss.
    opt = torch.optim.SGD(sharded.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
    with case(results, "model/loss_matches"):
        losses = []
        for step, batch in enumerate(batches):
            inp, tgt = batch[:, :-1], batch[:, 1:]
            loss = F.cross_entropy(ddp(inp[rank]), tgt[rank])
            opt.zero_grad()
            loss.backward()
            norms = memory_ext.clip_grad_norms(sharded, CLIP)
            opt.step()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss /= world

            ref_loss = F.cross_entropy(reference(inp.reshape(-1)), tgt.reshape(-1))
            ref_opt.zero_grad()
            ref_loss.backward()
            ref_norms = plain_clip_(reference, CLIP)
            ref_opt.step()
            assert_close(mean_loss, ref_loss.detach(), rtol=1e-5, atol=1e-6, msg=f"step {step}")
            # The sharded values' norm covers all columns: both models clip alike.
            assert_close(torch.stack(norms), torch.stack(ref_norms), rtol=1e-5, atol=1e-6, msg=f"step {step}")
            losses.append(ref_loss.item())
        assert losses[-1] < losses[0] - 0.05, f"the model did not train: {losses}"
        assert_close(md.full_table(sharded.values), reference.values.weight.detach(), rtol=1e-4, atol=1e-5)

"""The compact decoder, the FFN-swap helper, the optimizer recipe helpers and the usage statistics."""
import io
import math

import pytest
import torch
from torch import nn

from memory_ext import MemoryValues, ProductKeyMemory
from memory_ext.model import Decoder, DecoderConfig, flops_per_token, memory_placement, swap_ffn
from memory_ext.nn import clip_grad_norms, memory_usage, param_groups, track_usage, usage_from_counts


def tiny(memory=True, **kw):
    cfg = DecoderConfig(vocab_size=50, dim=32, n_layers=4, n_heads=2, max_seq_len=16, **kw)
    if memory:
        cfg.memory_layers = memory_placement(4)
        cfg.memory = dict(n_keys=8, heads=2, k=4)
    torch.manual_seed(0)
    return Decoder(cfg)


def test_placement_is_centred_with_wide_stride():
    assert memory_placement(24) == (4, 12, 20)
    assert memory_placement(12) == (2, 6, 10)
    assert memory_placement(6) == (1, 3, 5)
    assert memory_placement(4) == (0, 2, 3)
    with pytest.raises(ValueError, match="count must be in"):
        memory_placement(2, 3)


def test_decoder_shapes_and_memory_layout():
    model = tiny()
    tokens = torch.randint(0, 50, (3, 16))
    assert model(tokens).shape == (3, 16, 50)
    mems = [b.ffn for b in model.layers if isinstance(b.ffn, ProductKeyMemory)]
    assert [i for i, b in enumerate(model.layers) if isinstance(b.ffn, ProductKeyMemory)] == [0, 2, 3]
    assert all(m.values is mems[0].values for m in mems)
    assert sum(isinstance(m, MemoryValues) for m in model.modules()) == 1
    with pytest.raises(ValueError, match="exceeds max_seq_len 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_causal():
    model = tiny()
    a = torch.randint(0, 50, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 50
    torch.testing.assert_close(model(a)[:, :10], model(b)[:, :10])


def test_gradient_reaches_every_parameter():
    model = tiny()
    model(torch.randint(0, 50, (4, 16))).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_memory_model_is_the_dense_model_with_ffns_swapped():
    dense, mem = tiny(memory=False), tiny()
    dense_params = dict(dense.named_parameters())
    for name, p in mem.named_parameters():
        if ".ffn." not in name:
            assert torch.equal(p, dense_params[name]), name


def test_state_dict_round_trip_into_fresh_model():
    model = tiny()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(7)
    fresh = Decoder(model.cfg)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for (n, p), q in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    pools = {id(b.ffn.values) for b in fresh.layers if isinstance(b.ffn, ProductKeyMemory)}
    assert len(pools) == 1
    tokens = torch.randint(0, 50, (2, 16))
    assert torch.equal(model(tokens), fresh(tokens))


class MLPBlock(nn.Module):
    """A block of some other model: its FFN is called ``mlp``."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def test_swap_ffn_on_another_model():
    blocks = nn.Sequential(*(MLPBlock(24) for _ in range(5)))
    pool = swap_ffn(blocks, [1, 3], 24, attr="mlp", n_keys=6, heads=2, k=3, qk_norm=False)
    assert isinstance(pool, MemoryValues) and pool.n_rows == 36 and pool.dim == 24
    assert [type(b.mlp).__name__ for b in blocks] == ["Sequential", "ProductKeyMemory", "Sequential", "ProductKeyMemory", "Sequential"]
    assert blocks[1].mlp.values is blocks[3].mlp.values is pool and blocks[1].mlp.query_gain is None
    x = torch.randn(2, 7, 24)
    blocks(x).sum().backward()
    assert pool.weight.grad is not None and pool.weight.grad.abs().sum() > 0
    given = MemoryValues(36, 24)
    assert swap_ffn(blocks, [0], 24, attr="mlp", values=given, n_keys=6, k=3) is given
    with pytest.raises(ValueError, match="block 2 has no submodule 'ffn'"):
        swap_ffn(blocks, [2], 24, n_keys=6, k=3)


def test_flops_per_token_by_hand():
    dense, mem = tiny(memory=False), tiny()
    dim, hidden, seq, vocab = 32, dense.cfg.hidden, 16, 50
    block = 2 * (3 * dim * dim + dim * dim) + 2 * dim * seq + 2 * 3 * dim * hidden
    assert flops_per_token(dense, seq) == 4 * block + 2 * dim * vocab
    # memory layer: query (heads * k_dim), gate, out; two half-score GEMMs; a bag of heads * k rows
    k_dim = dim // 2
    memory = 2 * dim * 2 * k_dim + 2 * 2 * dim * dim + 2 * 2 * 8 * k_dim + 2 * 2 * 4 * dim
    assert flops_per_token(mem, seq) == flops_per_token(dense, seq) + 3 * (memory - 2 * 3 * dim * hidden)


def test_param_groups():
    model = tiny()
    groups = param_groups(model, 1e-3, weight_decay=0.1, values="dense")
    by_name = {g["name"]: g for g in groups}
    pool = next(m for m in model.modules() if isinstance(m, MemoryValues))
    assert by_name["values"]["params"] == [pool.weight]
    assert by_name["values"]["lr"] == pytest.approx(1e-2) and by_name["values"]["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in by_name["decay"]["params"]) and by_name["decay"]["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in by_name["no_decay"]["params"])
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter once
    asked = {
        g["name"]: g
        for g in param_groups(model, 1e-3, values="dense", values_lr_scale=3.0, values_weight_decay=0.05)
    }
    assert asked["values"]["lr"] == pytest.approx(3e-3) and asked["values"]["weight_decay"] == 0.05
    torch.optim.AdamW(groups).step()  # accepted by a torch optimizer as they are


def test_clip_grad_norms_clips_values_separately():
    model = tiny()
    model(torch.randint(0, 50, (4, 16))).square().sum().backward()
    pool = next(m for m in model.modules() if isinstance(m, MemoryValues)).weight
    others = [p for p in model.parameters() if p is not pool]
    want_values = pool.grad.norm()
    want_others = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in others]))
    expected_values = pool.grad * min(1.0, 0.5 / (want_values.item() + 1e-6))
    expected_other = [p.grad * min(1.0, 0.25 / (want_others.item() + 1e-6)) for p in others]
    norm_other, norm_values = clip_grad_norms(model, 0.25, values_max_norm=0.5)
    torch.testing.assert_close(norm_other, want_others)
    torch.testing.assert_close(norm_values, want_values)
    torch.testing.assert_close(pool.grad, expected_values)
    for p, e in zip(others, expected_other, strict=True):
        torch.testing.assert_close(p.grad, e)
    assert pool.grad.norm() <= 0.5 + 1e-5


def test_usage_statistics():
    model = tiny()
    track_usage(model)
    tokens = torch.randint(0, 50, (2, 16))
    model(tokens)
    layers = [m for m in model.modules() if isinstance(m, ProductKeyMemory)]
    assert "usage" not in "".join(model.state_dict())  # statistics are not checkpointed
    counts = [layer.usage.clone() for layer in layers]
    assert all(c.sum() == 2 * 16 * 2 * 4 for c in counts)  # tokens * heads * k reads each
    stats = memory_usage(model)
    assert list(stats) == [f"layers.{i}.ffn" for i in (0, 2, 3)]
    for c, s in zip(counts, stats.values(), strict=True):
        p = c.double() / c.sum()
        kl = sum(pi * math.log(pi * 64) for pi in p.tolist() if pi > 0)
        assert s["rows_read"] == pytest.approx((c > 0).double().mean().item())
        assert s["kl_uniform"] == pytest.approx(kl) and s["reads"] == c.sum()
    assert all(layer.usage.sum() == 0 for layer in layers)  # a new window started
    track_usage(model, enabled=False)
    assert all(layer.usage is None for layer in layers) and memory_usage(model) == {}


def test_usage_from_counts_extremes():
    read, kl = usage_from_counts(torch.tensor([5, 5, 5, 5]))
    assert read.item() == 1.0 and kl.item() == pytest.approx(0.0, abs=1e-12)
    read, kl = usage_from_counts(torch.tensor([0, 9, 0, 0]))
    assert read.item() == 0.25 and kl.item() == pytest.approx(math.log(4))
    read, kl = usage_from_counts(torch.zeros(4, dtype=torch.long))
    assert read.item() == 0.0 and kl.item() == 0.0

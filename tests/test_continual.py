"""Sparse memory finetuning: background counts, row ranking, which rows and parameters a step changes."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from memory_ext import MemoryValues
from memory_ext.continual import (
    BackgroundUsage,
    LoRALinear,
    SparseMemoryFinetuner,
    add_lora,
    background_usage,
    freeze_all_but_values,
    kl_scores,
    memory_pools,
    tfidf_scores,
)
from memory_ext.model import Decoder, DecoderConfig

VOCAB, SEQ = 40, 12


def tiny(seed=0, memory_layers=(0, 2), device="cpu", sparse_grad=False, n_keys=8):
    memory = dict(n_keys=n_keys, heads=2, k=3)
    if sparse_grad:
        memory["values"] = MemoryValues(n_keys * n_keys, 16, device=device, sparse_grad=True)
    cfg = DecoderConfig(VOCAB, dim=16, n_layers=3, n_heads=2, max_seq_len=SEQ, memory_layers=memory_layers, memory=memory)
    torch.manual_seed(seed)
    return Decoder(cfg).to(device)


def batches(n, seed=0, device="cpu", batch=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, SEQ + 1), generator=g).to(device) for _ in range(n)]


def loss_of(model, batch):
    return F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())


def reference_counts(model, data):
    """Plain PyTorch: each pool's reads from the layers' own lookups, bincount per batch."""
    pools = memory_pools(model)
    layers = [m for m in model.modules() if hasattr(m, "lookup")]
    counts = [torch.zeros(p.n_rows, dtype=torch.int64) for _, p in pools]
    df = [torch.zeros(p.n_rows, dtype=torch.int64) for _, p in pools]
    seen = []
    handles = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0]))) for m in layers]
    with torch.no_grad():
        for b in data:
            seen.clear()
            model(b)
            batch = [torch.zeros_like(c) for c in counts]
            for mod, x in seen:
                i = [id(p) for _, p in pools].index(id(mod.values))
                idx, _ = mod.lookup(x.reshape(-1, mod.dim))
                batch[i] += torch.bincount(idx.flatten().cpu(), minlength=mod.values.n_rows)
            for c, d, bc in zip(counts, df, batch, strict=True):
                c += bc
                d += bc > 0
    for h in handles:
        h.remove()
    return counts, df


@pytest.mark.parametrize("shared", [True, False])
def test_background_counts_equal_plain_count(shared):
    model = tiny()
    if not shared:  # one own table per layer
        from memory_ext.model import swap_ffn

        torch.manual_seed(1)
        swap_ffn(model.layers, (2,), 16, n_keys=8, heads=2, k=3)
    data = batches(4)
    bg = background_usage(model, [b[:, :-1] for b in data])
    ref_counts, ref_df = reference_counts(model, [b[:, :-1] for b in data])
    assert len(bg.counts) == (1 if shared else 2) and bg.n_batches == 4
    for c, d, rc, rd in zip(bg.counts, bg.doc_freq, ref_counts, ref_df, strict=True):
        assert torch.equal(c, rc) and torch.equal(d, rd)
    # a shared pool is read by both layers: 2 layers x tokens x heads x k
    if shared:
        assert int(bg.counts[0].sum()) == 4 * 2 * 3 * SEQ * 2 * 3
    assert background_usage(model, [b[:, :-1] for b in data], max_batches=2).n_batches == 2


def test_background_state_dict_round_trip(tmp_path):
    model = tiny()
    bg = background_usage(model, [b[:, :-1] for b in batches(3)])
    torch.save(bg.state_dict(), tmp_path / "bg.pt")
    back = BackgroundUsage.from_state_dict(torch.load(tmp_path / "bg.pt"))
    assert back.names == bg.names and back.n_batches == bg.n_batches
    assert all(torch.equal(a, b) for a, b in zip(back.counts + back.doc_freq, bg.counts + bg.doc_freq, strict=True))
    other = BackgroundUsage.from_state_dict(bg.state_dict())
    other.load_state_dict(back.state_dict())
    assert torch.equal(other.counts[0], bg.counts[0])


def test_tfidf_ordering():
    # rows 0 and 1 read as often in the batch; row 0 rarely in the background, row 1 in every batch.
    batch = torch.tensor([5, 5, 1, 0])
    df = torch.tensor([1, 10, 1, 0])
    s = tfidf_scores(batch, df, n_batches=10)
    assert s[0] > s[1] and s[0] > s[2] and s[3] == -math.inf
    assert math.isclose(float(s[1]), 0.0, abs_tol=1e-12)  # read in every background batch: idf = 0
    kl = kl_scores(batch, torch.tensor([1, 1000, 1, 0]))
    assert kl[0] > kl[1] and kl[3] == -math.inf


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("score", ["tfidf", "kl"])
def test_only_selected_rows_change(optimizer, sparse_grad, score, device):
    model = tiny(sparse_grad=sparse_grad, device=device)
    bg = background_usage(model, [b[:, :-1] for b in batches(6, seed=1, device=device)])
    top_t = 7
    ft = SparseMemoryFinetuner(model, bg, top_t=top_t, lr=0.1, optimizer=optimizer, score=score)
    (name, pool), = memory_pools(model)
    for step, b in enumerate(batches(3, seed=2, device=device)):
        before = _snapshot(model)
        counter = background_usage(model, [b[:, :-1]])  # the rows this batch reads
        loss_of(model, b).backward()
        rows = ft.step()[0]
        ft.zero_grad()
        read = (counter.counts[0] > 0).nonzero().flatten()
        assert 1 <= rows.numel() <= top_t
        assert set(rows.tolist()) <= set(read.tolist())
        after = _snapshot(model)
        for k in before:
            if k.endswith("values.weight"):
                changed = (before[k] != after[k]).any(-1).nonzero().flatten()
                assert set(changed.tolist()) <= set(rows.tolist())
                assert changed.numel() > 0 or step > 0
            else:
                assert torch.equal(before[k], after[k]), k


def test_rows_ranked_by_tfidf():
    """The rows picked are exactly the top_t TF-IDF scores of the batch's reads."""
    model = tiny()
    bg = background_usage(model, [b[:, :-1] for b in batches(6, seed=1)])
    ft = SparseMemoryFinetuner(model, bg, top_t=5, lr=0.1)
    b = batches(1, seed=3)[0]
    batch_counts = background_usage(model, [b[:, :-1]]).counts[0]
    loss_of(model, b).backward()
    expected = tfidf_scores(batch_counts, bg.doc_freq[0], bg.n_batches)
    assert torch.equal(ft.scores(0), expected)
    rows = ft.step()[0]
    top = expected.sort(descending=True, stable=True).indices[:5].sort().values
    assert torch.equal(rows, top)


def test_accumulated_steps_count_all_forwards_and_not_eval():
    model = tiny()
    bg = background_usage(model, [b[:, :-1] for b in batches(4, seed=1)])
    ft = SparseMemoryFinetuner.all_rows_read(model, bg, lr=0.1)
    data = batches(2, seed=5)
    for b in data:
        loss_of(model, b).backward()
    with torch.no_grad():
        model(batches(1, seed=9)[0][:, :-1])
    expected = background_usage(model, [b[:, :-1] for b in data]).counts[0]
    assert torch.equal(ft._counter.counts[0], expected)
    rows = ft.step()[0]
    assert torch.equal(rows, (expected > 0).nonzero().flatten())
    assert int(ft._counter.counts[0].sum()) == 0


def test_separate_pools_ranked_per_pool():
    from memory_ext.model import swap_ffn

    model = tiny(memory_layers=(0,))
    torch.manual_seed(1)
    swap_ffn(model.layers, (2,), 16, n_keys=8, heads=2, k=3)
    bg = background_usage(model, [b[:, :-1] for b in batches(4, seed=1)])
    ft = SparseMemoryFinetuner(model, bg, top_t=4, lr=0.1)
    loss_of(model, batches(1, seed=2)[0]).backward()
    rows = ft.step()
    assert len(rows) == 2 and all(1 <= r.numel() <= 4 for r in rows)


def test_full_finetune_moves_other_parameters_and_deterministic():
    def run():
        model = tiny()
        bg = background_usage(model, [b[:, :-1] for b in batches(4, seed=1)])
        ft = SparseMemoryFinetuner.full(model, bg, lr=0.05, optimizer="adam", other_lr=1e-3)
        for b in batches(3, seed=2):
            loss_of(model, b).backward()
            ft.step()
            ft.zero_grad()
        return model

    a, b = run(), run()
    start = tiny()
    assert not torch.equal(a.embed.weight, start.embed.weight)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), k


def test_freeze_all_but_values():
    model = tiny()
    tables = freeze_all_but_values(model)
    assert len(tables) == 1
    assert [p for p in model.parameters() if p.requires_grad] == tables


def test_lora():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    x = torch.randn(4, 6)
    lora = LoRALinear(base, rank=2)
    assert torch.equal(lora(x), base(x))  # B starts at zero
    model = tiny()
    ref = model(batches(1)[0][:, :-1])
    params = add_lora(model, rank=2)
    assert torch.equal(model(batches(1)[0][:, :-1]), ref)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    assert len(params) == 2 * (3 * 2 + 3)  # qkv, proj in 3 blocks; w1, w2, w3 in the one dense FFN
    opt = torch.optim.SGD(params, lr=0.1)
    loss_of(model, batches(1)[0]).backward()
    opt.step()
    assert not torch.equal(model(batches(1)[0][:, :-1]), ref)


def test_errors():
    dense = Decoder(DecoderConfig(VOCAB, dim=16, n_layers=2, n_heads=2, max_seq_len=SEQ))
    with pytest.raises(ValueError, match="no memory layers"):
        background_usage(dense, [b[:, :-1] for b in batches(1)])
    model = tiny()
    bg = background_usage(model, [b[:, :-1] for b in batches(2)])
    with pytest.raises(ValueError, match="no memory layers"):
        SparseMemoryFinetuner(dense, bg)
    with pytest.raises(ValueError, match="top_t"):
        SparseMemoryFinetuner(model, bg, top_t=0)
    with pytest.raises(ValueError, match="unknown score 'bm25'"):
        SparseMemoryFinetuner(model, bg, score="bm25")
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'"):
        SparseMemoryFinetuner(model, bg, optimizer="adamw")
    with pytest.raises(ValueError, match="another model"):
        SparseMemoryFinetuner(tiny(n_keys=6), bg)
    with pytest.raises(ValueError, match="needs a background"):
        SparseMemoryFinetuner(model, None, top_t=3)
    with pytest.raises(ValueError, match="no batches"):
        background_usage(model, [])


def test_demo_smoke(tmp_path, capsys):
    from memory_ext import demo_continual

    tiny_args = ["--entities", "12", "--new-entities", "3", "--dim", "32", "--layers", "3", "--heads", "2",
                 "--n-keys", "8", "--mem-heads", "2", "--topk", "4", "--batch", "2", "--seq", "16",
                 "--pretrain-steps", "3", "--background-batches", "2", "--steps", "2", "--eval-every", "1",
                 "--eval-subset", "8", "--top-t", "5", "--out", str(tmp_path)]
    report = demo_continual.main(tiny_args)
    saved = json.loads((tmp_path / "continual.json").read_text())
    assert set(saved["methods"]) == {"full", "lora", "memory-read", "sparse"} == set(report["methods"])
    assert "commit" in saved["machine"] and "out" not in saved["config"]
    for r in saved["methods"].values():
        assert [p["step"] for p in r["curve"]] == [0, 1, 2] and r["background_nll"] > 0
    assert saved["methods"]["sparse"]["rows_updated_last_step"][0] <= 5
    assert len(list(tmp_path.glob("pretrained_*.pt"))) == 1
    demo_continual.main(tiny_args + ["--methods", "sparse"])  # reuses the cached checkpoint
    assert "checkpoint loaded" in capsys.readouterr().err

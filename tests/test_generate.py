"""Decoder.generate and the KV cache: greedy decoding with the cache gives the tokens of the
full forward re-run on the growing sequence (dense and Memory+), cached logits match the
full forward's, memory layers see only the new token, sampling is reproducible and bounded
by top_k, and bad input is rejected; and the decode benchmark's smoke run."""
import json
import os
import subprocess
import sys

import pytest
import torch

from memory_ext import ProductKeyMemory
from memory_ext.model import Decoder, DecoderConfig, KVCache, memory_placement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, MAX_LEN = 97, 40


def model(memory: bool, dtype: torch.dtype = torch.float32, seed: int = 0) -> Decoder:
    cfg = DecoderConfig(VOCAB, dim=64, n_layers=4, n_heads=4, max_seq_len=MAX_LEN)
    if memory:
        cfg.memory_layers = memory_placement(4)
        cfg.memory = dict(n_keys=16, heads=2, k=4)
    torch.manual_seed(seed)
    return Decoder(cfg).to(dtype).eval()


def greedy_by_full_forward(m: Decoder, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """The reference: the whole sequence through forward again for every new token."""
    seq = prompt
    for _ in range(steps):
        seq = torch.cat((seq, m(seq)[:, -1].argmax(-1, keepdim=True).to(seq.dtype)), dim=1)
    return seq


def cached_logits(m: Decoder, seq: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of seq fed through one cache in chunks of the given lengths."""
    cache, out, start = m.new_cache(), [], 0
    for n in chunks:
        out.append(m(seq[:, start : start + n], cache))
        start += n
    assert cache.length == start == seq.shape[1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("memory", [False, True], ids=["dense", "memory+"])
def test_greedy_with_cache_equals_full_forward_rerun(memory):
    m = model(memory)
    prompt = torch.randint(0, VOCAB, (3, 6))
    out = m.generate(prompt, 24)
    assert out.shape == (3, 30) and torch.equal(out[:, :6], prompt)
    assert torch.equal(out, greedy_by_full_forward(m, prompt, 24))
    # batch 1 agrees with the batch: rows are independent
    assert torch.equal(m.generate(prompt[1:2], 24), out[1:2])


@pytest.mark.parametrize("memory", [False, True], ids=["dense", "memory+"])
def test_cached_logits_equal_full_forward(memory):
    """Prefill, a chunk of several tokens after the cache (the offset causal mask), then single
    tokens: each position's logits are those of one full forward, in fp32 to rounding."""
    m = model(memory)
    seq = torch.randint(0, VOCAB, (2, MAX_LEN))
    full = m(seq)
    torch.testing.assert_close(cached_logits(m, seq, [7, 5] + [1] * 28), full, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(cached_logits(m, seq, [MAX_LEN]), full, atol=2e-5, rtol=1e-4)


def test_cached_logits_bf16_dense():
    """bf16 (dense; a bf16 Memory+ model's top-k can flip on the last-bit differences
    between GEMM shapes, with or without the cache): cached logits within bf16 rounding."""
    m = model(False, torch.bfloat16)
    seq = torch.randint(0, VOCAB, (2, 24))
    full = m(seq).float()
    got = cached_logits(m, seq, [5] + [1] * 19).float()
    assert got.dtype == full.dtype and (got - full).abs().max() < 2e-2 * full.abs().max()
    assert m.generate(seq[:, :5], 8).shape == (2, 13)


def test_memory_layers_run_on_the_new_token_only():
    m = model(True)
    seen = []
    for layer in m.modules():
        if isinstance(layer, ProductKeyMemory):
            layer.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    m.generate(torch.randint(0, VOCAB, (2, 9)), 4)
    # three memory layers: the prefill (9 tokens), then 3 steps of one token (the last
    # token generated is not run)
    assert seen == [(2, 9, 64)] * 3 + [(2, 1, 64)] * 9


def test_sampling_is_reproducible_and_within_top_k():
    m = model(True)
    prompt = torch.randint(0, VOCAB, (4, 3))

    def sample(seed, **kw):
        return m.generate(prompt, 20, temperature=1.5, generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = sample(1), sample(1), sample(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    top3 = sample(3, top_k=3)
    logits = m(top3[:, :-1])[:, 2:]  # the logits each generated token was drawn from
    allowed = logits.topk(3, dim=-1).indices
    assert (allowed == top3[:, 3:, None]).any(-1).all()
    assert not (logits.argmax(-1) == top3[:, 3:]).all()  # really sampled, not greedy
    # top_k = 1 is greedy, whatever the temperature
    assert torch.equal(sample(4, top_k=1), m.generate(prompt, 20))


def test_int32_prompts_and_zero_new_tokens():
    m = model(False)
    prompt = torch.randint(0, VOCAB, (2, 5), dtype=torch.int32)
    out = m.generate(prompt, 3)
    assert out.dtype == torch.int32 and torch.equal(out, m.generate(prompt.long(), 3).int())
    assert torch.equal(m.generate(prompt, 0), prompt)


def test_forward_without_cache_unchanged_by_a_fresh_cache():
    m = model(True)
    seq = torch.randint(0, VOCAB, (2, 12))
    cache = m.new_cache()
    assert isinstance(cache, KVCache) and cache.length == 0
    assert torch.equal(m(seq), m(seq, cache)) and cache.length == 12


def test_bad_input():
    m = model(False)
    prompt = torch.randint(0, VOCAB, (1, 30))
    with pytest.raises(ValueError, match=r"generate: prompt length 30 \+ max_new_tokens 11 exceeds max_seq_len 40"):
        m.generate(prompt, 11)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        m.generate(prompt, -1)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        m.generate(prompt, 2, temperature=-0.5)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        m.generate(prompt, 2, temperature=float("nan"))
    with pytest.raises(ValueError, match="top_k must be None or an int >= 1"):
        m.generate(prompt, 2, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="at least one token"):
        m.generate(prompt[:, :0], 2)
    with pytest.raises(ValueError, match="token ids must be in"):
        m.generate(prompt + VOCAB, 2)
    with pytest.raises(ValueError, match="tokens must be 2-D"):
        m.generate(prompt[0], 2)
    cache = m.new_cache(32)
    m(prompt, cache)
    with pytest.raises(ValueError, match="cache holds at most 32 tokens per sequence; 30 cached \\+ 3 new exceed it"):
        m(prompt[:, :3], cache)
    with pytest.raises(ValueError, match="cache holds a batch of 1 sequences, got 2"):
        m(torch.zeros(2, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match=r"new_cache: max_len must be in \[1, max_seq_len = 40\], got 41"):
        m.new_cache(41)
    with pytest.raises(ValueError, match="cache must be a KVCache of 4 layers"):
        m(prompt, KVCache(2, 40))


def test_decode_benchmark_quick_run(tmp_path):
    out = tmp_path / "decode.json"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_decode.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["machine"]["commit"]
    models = {r["model"] for r in report["results"]}
    assert models == {"dense", "memory+"}, models
    for r in report["results"]:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["tokens_per_s"] > 0, r
        if r["model"] == "memory+":
            assert 0 < r["memory_share"] < 1, r


def test_memory_scoring_cache_is_exact_and_follows_parameter_updates():
    """Without autograd the normalised sub-keys are reused: bitwise what a grad-mode call
    computes, and recomputed after an in-place update or a new parameter."""
    torch.manual_seed(0)
    layer = ProductKeyMemory(32, n_keys=16, heads=2, k=4)
    x = torch.randn(5, 32)

    def fresh():  # grad mode with parameters that need grad: never cached
        idx, w = layer.lookup(x)
        return idx, w.detach()

    for change in (lambda: layer.keys.mul_(-1.5), lambda: layer.query_gain.add_(0.25),
                   lambda: setattr(layer, "keys", torch.nn.Parameter(torch.rand_like(layer.keys)))):
        with torch.no_grad():
            cached = layer.lookup(x), layer.lookup(x)
        expected = fresh()
        for idx, w in cached:
            assert torch.equal(idx, expected[0]) and torch.equal(w, expected[1])
        with torch.no_grad():
            change()
        with torch.no_grad():
            after = layer.lookup(x)
        assert torch.equal(after[0], fresh()[0]) and torch.equal(after[1], fresh()[1])
        assert not torch.equal(after[1], expected[1])  # the change reached the lookup


def test_training_after_generate_with_frozen_keys():
    """generate runs in inference mode; what it leaves cached must not break a later training
    step whose memory keys are frozen (sparse memory finetuning trains only the values)."""
    m = model(True)
    for name, p in m.named_parameters():
        p.requires_grad_("values" in name)
    out = m.generate(torch.randint(0, VOCAB, (2, 4)), 6)
    assert not out.is_inference()
    m(out).logsumexp(-1).sum().backward()
    values = next(p for n, p in m.named_parameters() if "values" in n)
    assert values.grad is not None and values.grad.abs().sum() > 0

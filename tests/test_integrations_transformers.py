"""Memory layers in Hugging Face causal LMs: tiny random models of each family, no downloads."""
import copy
import importlib.util
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")

from safetensors import safe_open  # noqa: E402

from memory_ext.integrations.trainer import MemoryValuesCallback  # noqa: E402
from memory_ext.integrations.transformers import (  # noqa: E402
    ParallelMemory,
    add_memory,
    decoder_blocks,
    freeze_all_but_memory,
    from_pretrained,
    unfreeze,
)
from memory_ext.model import memory_placement  # noqa: E402
from memory_ext.nn import ProductKeyMemory, param_groups, value_optimizer, value_tables  # noqa: E402

VOCAB = 64
# Special tokens inside the tiny vocabulary, and no end-of-text: generation runs its full length.
TOKENS = dict(bos_token_id=0, eos_token_id=None, pad_token_id=0)
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**SIZES, num_key_value_heads=2, **TOKENS),
    "qwen2": lambda: transformers.Qwen2Config(**SIZES, num_key_value_heads=2, **TOKENS),
    "mistral": lambda: transformers.MistralConfig(**SIZES, num_key_value_heads=2, **TOKENS),
    "gemma": lambda: transformers.GemmaConfig(**SIZES, num_key_value_heads=2, head_dim=8, **TOKENS),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, **TOKENS),
}
MEMORY = dict(n_keys=8, heads=2, k=4)
_BUILT = {}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine waiting threads cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fresh(family: str):
    """A copy of the family's tiny random model (built once per module), in eval mode."""
    if family not in _BUILT:
        torch.manual_seed(0)
        _BUILT[family] = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    return copy.deepcopy(_BUILT[family])


def tokens(seed: int = 1, shape=(2, 7)) -> torch.Tensor:
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def memory_layers(model) -> list[ProductKeyMemory]:
    return [m for m in model.modules() if isinstance(m, ProductKeyMemory)]


@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_at_init_computes_the_original(family):
    model, x = fresh(family), tokens()
    with torch.no_grad():
        ref = model(x).logits
        torch.manual_seed(2)
        add_memory(model, mode="parallel", **MEMORY)
        out = model(x).logits
    assert torch.equal(out, ref)
    name, blocks = decoder_blocks(model)
    chosen = [i for i, b in enumerate(blocks) if isinstance(b.mlp, ParallelMemory)]
    assert chosen == list(memory_placement(len(blocks), 3)) == model.config.memory_ext["layers"]
    pools = {id(m.values) for m in memory_layers(model)}
    assert len(pools) == 1 and len(value_tables(model)) == 1
    # The memory does run: its output is zero only because W2 is.
    block = blocks[chosen[0]].mlp
    h = torch.randn(3, 32)
    with torch.no_grad():
        block.memory.out.weight.normal_()
        assert not torch.equal(block(h), block.ffn(h))


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_runs_and_trains_the_pool(family):
    model, x = fresh(family), tokens()
    with torch.no_grad():
        ref = model(x).logits
    torch.manual_seed(3)
    add_memory(model, [0, 2], mode="replace", **MEMORY)
    _, blocks = decoder_blocks(model)
    assert isinstance(blocks[0].mlp, ProductKeyMemory) and isinstance(blocks[2].mlp, ProductKeyMemory)
    assert not isinstance(blocks[1].mlp, ProductKeyMemory)
    assert blocks[0].mlp.values is blocks[2].mlp.values
    out = model(x).logits
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)
    out.float().logsumexp(-1).mean().backward()
    assert blocks[0].mlp.values.weight.grad.abs().sum() > 0


def _trained_a_little(model, x, steps=2):
    """Two AdamW steps on everything (so that W2 leaves zero and the values move)."""
    opt = torch.optim.AdamW(param_groups(model, 1e-2, values="dense"))
    for _ in range(steps):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("mode", ["replace", "parallel"])
@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_bitwise(family, mode, tmp_path):
    model, x = fresh(family), tokens()
    torch.manual_seed(4)
    add_memory(model, mode=mode, **MEMORY)
    _trained_a_little(model.train(), x).eval()
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["memory_ext"] == model.config.memory_ext
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert sum(key.endswith("values.weight") for key in f.keys()) == 1  # the shared pool, once
    torch.manual_seed(5)  # the rebuilt model's own random memory differs from the saved one
    loaded = from_pretrained(tmp_path)
    assert not loaded.training and loaded.config.memory_ext == model.config.memory_ext
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key
    pools = {id(m.values) for m in memory_layers(loaded)}
    assert len(pools) == 1 and len(memory_layers(loaded)) == 3
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_sharded_checkpoint_reloads_bitwise(tmp_path):
    model, x = fresh("llama"), tokens()
    add_memory(model, mode="parallel", **MEMORY)
    _trained_a_little(model.train(), x).eval()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = from_pretrained(tmp_path)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[key], got[key]) for key in want)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_the_kv_cache(family):
    model, x = fresh(family), tokens(shape=(2, 5))
    greedy = dict(max_new_tokens=4, do_sample=False)
    ref = model.generate(x, **greedy)
    torch.manual_seed(6)
    parallel = add_memory(copy.deepcopy(model), mode="parallel", **MEMORY)
    assert torch.equal(parallel.generate(x, **greedy), ref)
    replaced = add_memory(model, mode="replace", **MEMORY)
    cached = replaced.generate(x, use_cache=True, **greedy)
    assert cached.shape == (2, 9) and torch.equal(cached[:, :5], x)
    # Memory layers are per token: decoding the new token alone with the cache gives what
    # the full recomputation of the sequence gives.
    assert torch.equal(cached, replaced.generate(x, use_cache=False, **greedy))


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_one_trains_the_memory_only(family):
    model, x = fresh(family), tokens()
    torch.manual_seed(7)
    add_memory(model, mode="parallel", **MEMORY)
    freeze_all_but_memory(model.train())
    memory_ids = {id(p) for m in memory_layers(model) for p in m.parameters()}
    assert all(p.requires_grad == (id(p) in memory_ids) for p in model.parameters())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    dense = torch.optim.AdamW(param_groups(model, 1e-3), betas=(0.9, 0.95))
    values = value_optimizer(model, 1e-3)
    for _ in range(2):  # the first step moves W2 off zero, the second reaches the values
        model(x, labels=x).loss.backward()
        dense.step()
        values.step()
        model.zero_grad()
    pool = value_tables(model)[0].weight
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(p is pool for name, p in model.named_parameters() if name in changed)
    assert changed and all(id(p) in memory_ids for name, p in model.named_parameters() if name in changed)
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


class _Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x = tokens(8, shape=(8, 12))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


# transformers.Trainer runs on accelerate, which transformers itself does not install.
needs_trainer = pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None, reason="transformers.Trainer needs accelerate (pip install accelerate)"
)


@needs_trainer
@pytest.mark.parametrize("path", ["sparse", "fused"])
def test_trainer_with_the_recipe(path, tmp_path):
    model = fresh("llama")
    torch.manual_seed(8)
    add_memory(model, mode="replace", **MEMORY)
    freeze_all_but_memory(model)
    memory_ids = {id(p) for m in memory_layers(model) for p in m.parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    dense = torch.optim.AdamW(param_groups(model, 1e-3), betas=(0.9, 0.95))
    values = value_optimizer(model, 1e-3, fused=path == "fused", max_norm=1.0 if path == "fused" else None)
    # Sparse: the recipe's separate clipping in the callback, Trainer's joint clipping off.
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, use_cpu=True, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, max_grad_norm=0.0 if path == "sparse" else 1.0,
    )
    callback = MemoryValuesCallback(values, max_norm=1.0 if path == "sparse" else None)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_Tokens(), optimizers=(dense, None), callbacks=[callback]
    )
    trainer.train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    pool = value_tables(model)[0].weight
    assert any(p is pool for name, p in model.named_parameters() if name in changed)
    assert all(id(p) in memory_ids for name, p in model.named_parameters() if name in changed)
    # The values follow the dense schedule at 10x: their last rate is 10x the last one logged.
    last_lr = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h][-1]
    assert values.param_groups[0]["lr"] == pytest.approx(10 * last_lr)


@needs_trainer
def test_callback_refusals(tmp_path):
    model = add_memory(fresh("llama"), **MEMORY)
    values = value_optimizer(model, 1e-3)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_grad_norm=1.0)
    callback = MemoryValuesCallback(values, max_norm=1.0)
    dense = torch.optim.AdamW(param_groups(model, 1e-3))
    with pytest.raises(ValueError, match="set max_grad_norm=0"):
        callback.on_train_begin(args, None, None, model=model, optimizer=dense)
    fused = value_optimizer(model, 1e-3, fused=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", gradient_accumulation_steps=2
    )
    with pytest.raises(ValueError, match="fused table is updated at every backward pass"):
        MemoryValuesCallback(fused).on_train_begin(args, None, None, model=model, optimizer=dense)
    with pytest.raises(ValueError, match="must be a memory_ext.nn.RowOptimizer"):
        MemoryValuesCallback(dense)


def test_bad_models_and_options(tmp_path):
    opt = transformers.AutoModelForCausalLM.from_config(
        transformers.OPTConfig(vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                               num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32)
    )
    with pytest.raises(ValueError, match="found no list of decoder blocks .* 'mlp'"):
        add_memory(opt, **MEMORY)
    with pytest.raises(ValueError, match="expected a transformers PreTrainedModel, got Linear"):
        add_memory(torch.nn.Linear(2, 2))
    model = fresh("llama")
    with pytest.raises(ValueError, match="mode must be one of"):
        add_memory(model, mode="beside", **MEMORY)
    with pytest.raises(ValueError, match=r"layers must be a non-empty list of block indices in \[0, 3\), got \(3,\)"):
        add_memory(model, [3], **MEMORY)
    with pytest.raises(ValueError, match="must not repeat a block"):
        add_memory(model, [1, 1], **MEMORY)
    with pytest.raises(ValueError, match=r"unknown memory options \['heads_dim'\]"):
        add_memory(model, heads_dim=4, **MEMORY)
    with pytest.raises(ValueError, match="'parallel' needs swilu=True"):
        add_memory(model, mode="parallel", swilu=False, **MEMORY)
    with pytest.raises(ValueError, match="values must have n_keys"):
        add_memory(model, values=value_tables(add_memory(fresh("gpt2"), n_keys=4, heads=2, k=2))[0], **MEMORY)
    assert not memory_layers(model)  # every refusal left the model as it was
    add_memory(model, **MEMORY)
    with pytest.raises(ValueError, match="already has memory layers"):
        add_memory(model, **MEMORY)
    with pytest.raises(ValueError, match="has no memory layers"):
        freeze_all_but_memory(fresh("gpt2"))
    fresh("gpt2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no memory_ext settings"):
        from_pretrained(tmp_path)

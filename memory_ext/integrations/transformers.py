"""Memory layers in Hugging Face causal LMs: retrofit, freeze, save and reload.

``add_memory`` finds the model's decoder blocks (the one ModuleList whose blocks hold their
feed-forward as ``mlp``: Llama, Qwen2, Mistral, Gemma, GPT-2 and most decoder-only
families) and, in the chosen blocks, replaces that MLP by a ProductKeyMemory or adds one
beside it, all sharing one value pool. The settings go to ``model.config.memory_ext``, so
``model.save_pretrained(dir)`` writes everything a reload needs and
:func:`from_pretrained` rebuilds the model bit for bit.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
import transformers
from safetensors.torch import load_file
from torch import Tensor, nn

from memory_ext.model import memory_placement
from memory_ext.nn import MemoryValues, ProductKeyMemory

__all__ = ["add_memory", "ParallelMemory", "decoder_blocks", "freeze_all_but_memory", "unfreeze", "from_pretrained"]

_MODES = ("replace", "parallel")
# ProductKeyMemory options that add_memory passes on and records in the config (all JSON values).
_LAYER_OPTIONS = ("k_dim", "qk_norm", "swilu")
_SETTINGS_VERSION = 1
_REQUIRED = ("mode", "layers", "n_keys", "heads", "k", "value_dim", "value_dtype")


class ParallelMemory(nn.Module):
    """A block's feed-forward plus a memory layer on the same input: (..., dim) -> (..., dim).

    ``ffn`` is called as the block calls its MLP (extra arguments passed through; a tuple
    output, as mixture-of-experts blocks return, gets the memory added to its first item).
    """

    def __init__(self, ffn: nn.Module, memory: ProductKeyMemory) -> None:
        super().__init__()
        self.ffn, self.memory = ffn, memory

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        out = self.ffn(hidden_states, *args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] + self.memory(hidden_states), *out[1:])
        return out + self.memory(hidden_states)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder blocks -> (qualified name, ModuleList): the one list whose every block has an ``mlp``."""
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) and all(isinstance(getattr(b, "mlp", None), nn.Module) for b in m)
    ]
    if not found:
        raise ValueError(
            f"add_memory: found no list of decoder blocks holding their feed-forward as an 'mlp' submodule in "
            f"{type(model).__name__} (supported: decoder-only causal LMs such as Llama, Qwen2, Mistral, Gemma, GPT-2)"
        )
    if len(found) > 1:
        raise ValueError(
            f"add_memory: {type(model).__name__} has several lists of blocks with an 'mlp' submodule "
            f"({', '.join(name for name, _ in found)}); only models with one decoder stack are supported"
        )
    return found[0]


def add_memory(
    model: transformers.PreTrainedModel,
    layers: Sequence[int] | None = None,
    *,
    n_keys: int = 1024,
    heads: int = 4,
    k: int = 32,
    mode: str = "replace",
    values: MemoryValues | None = None,
    **memory_kwargs,
) -> transformers.PreTrainedModel:
    """Put ProductKeyMemory layers sharing one pool into blocks ``layers`` of a causal LM (in place) -> model.

    layers: block indices, default the Memory+ placement (memory_ext.model.memory_placement,
    three blocks or all of fewer). mode "replace": the block's MLP becomes the memory layer;
    "parallel": the block computes MLP(x) + memory(x) (a :class:`ParallelMemory`), with the
    memory's output projection W2 at zero, so the model's outputs are at first exactly
    those of the original. values: the shared pool (n_keys^2 rows), default a new one of
    width hidden_size in the MLP's dtype. memory_kwargs: k_dim, qk_norm, swilu, value_dtype.
    """
    name = type(model).__name__
    if not isinstance(model, transformers.PreTrainedModel):
        raise ValueError(f"add_memory: expected a transformers PreTrainedModel, got {name}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"add_memory: {name} is an encoder-decoder model; only decoder-only causal LMs are supported")
    if getattr(model.config, "memory_ext", None) is not None:
        raise ValueError(f"add_memory: {name} already has memory layers (config.memory_ext = {model.config.memory_ext})")
    if mode not in _MODES:
        raise ValueError(f"add_memory: mode must be one of {_MODES}, got {mode!r}")
    value_dtype = memory_kwargs.pop("value_dtype", None)
    unknown = sorted(set(memory_kwargs) - set(_LAYER_OPTIONS))
    if unknown:
        raise ValueError(f"add_memory: unknown memory options {unknown}; expected some of {list(_LAYER_OPTIONS)}")
    if mode == "parallel" and not memory_kwargs.get("swilu", True):
        raise ValueError("add_memory: mode 'parallel' needs swilu=True (its zero output projection starts the memory at 0)")
    blocks_name, blocks = decoder_blocks(model)
    layers = _check_layers(layers, len(blocks))
    dim = getattr(model.config, "hidden_size", None)
    if not isinstance(dim, int):
        raise ValueError(f"add_memory: {name}'s config has no integer hidden_size, got {dim!r}")
    ref = next(blocks[layers[0]].mlp.parameters(), None)
    if ref is None:
        raise ValueError(f"add_memory: block {layers[0]}'s mlp has no parameters to take a device and dtype from")
    values = _pool(values, n_keys, dim, value_dtype or ref.dtype, ref.device)
    owner = None
    for i in layers:
        memory = ProductKeyMemory(
            dim, n_keys=n_keys, heads=heads, k=k, values=values, device=ref.device, dtype=ref.dtype, **memory_kwargs
        )
        prefix = f"{blocks_name}.{i}.mlp"
        if mode == "parallel":
            with torch.no_grad():
                memory.out.weight.zero_()  # its bias is zero already: the memory adds exactly 0
            blocks[i].mlp = ParallelMemory(blocks[i].mlp, memory)
            prefix += ".memory"
        else:
            blocks[i].mlp = memory
        # The pool is one tensor under every layer's name. save_pretrained drops the names it
        # finds in some module's _tied_weights_keys and refuses other shared tensors, so all
        # layers but the first declare their copy tied; from_pretrained shares it again.
        if owner is None:
            owner = f"{prefix}.values.weight"
        else:
            memory._tied_weights_keys = {"values.weight": owner}
    model.config.memory_ext = {
        "version": _SETTINGS_VERSION,
        "mode": mode,
        "layers": list(layers),
        "n_keys": n_keys,
        "heads": heads,
        "k": k,
        "value_dim": values.dim,
        "value_dtype": str(values.weight.dtype).removeprefix("torch."),
        **memory_kwargs,
    }
    return model


def _check_layers(layers: Sequence[int] | None, n_blocks: int) -> tuple[int, ...]:
    if layers is None:
        return memory_placement(n_blocks, min(3, n_blocks))
    layers = tuple(layers)
    if not layers or any(not isinstance(i, int) or not 0 <= i < n_blocks for i in layers):
        raise ValueError(f"add_memory: layers must be a non-empty list of block indices in [0, {n_blocks}), got {layers}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"add_memory: layers must not repeat a block, got {layers}")
    return tuple(sorted(layers))


def _pool(values: MemoryValues | None, n_keys: int, dim: int, dtype: torch.dtype, device: torch.device) -> MemoryValues:
    if values is None:
        return MemoryValues(n_keys * n_keys, dim, dtype=dtype, device=device)
    if not isinstance(values, MemoryValues):
        raise ValueError(f"add_memory: values must be a memory_ext.MemoryValues, got {type(values).__name__}")
    if values.sharded:
        raise ValueError("add_memory: a pool sharded over a process group cannot be saved with save_pretrained")
    if values.n_rows != n_keys * n_keys:
        raise ValueError(f"add_memory: values must have n_keys^2 = {n_keys * n_keys} rows, got {values.n_rows}")
    return values


def _memory_modules(model: nn.Module) -> list[ProductKeyMemory]:
    layers = [m for m in model.modules() if isinstance(m, ProductKeyMemory)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no memory layers (add them with add_memory)")
    return layers


def freeze_all_but_memory(model: nn.Module) -> nn.Module:
    """Retrofit stage 1: only the memory layers' parameters (and their pool) train -> model."""
    layers = _memory_modules(model)
    model.requires_grad_(False)
    for m in layers:
        m.requires_grad_(True)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Stage 2: every parameter of the model trains again -> model."""
    return model.requires_grad_(True)


def from_pretrained(path: str | os.PathLike, *, device: torch.device | str | None = None, **kwargs) -> transformers.PreTrainedModel:
    """Rebuild a model saved (in local directory ``path``) by ``save_pretrained`` after add_memory, bit for bit.

    The architecture comes from ``config.json`` (its ``memory_ext`` settings re-run
    add_memory), the weights from the safetensors files; a tensor is kept in the dtype it
    was saved in unless ``dtype`` is given. kwargs go to AutoModelForCausalLM.from_config
    (dtype, attn_implementation, trust_remote_code). Returned in eval mode, as HF does.
    """
    config = transformers.AutoConfig.from_pretrained(path)
    settings = getattr(config, "memory_ext", None)
    if not isinstance(settings, dict):
        raise ValueError(
            f"from_pretrained: {path}'s config.json has no memory_ext settings; a model without memory layers "
            "loads with transformers.AutoModelForCausalLM.from_pretrained"
        )
    if settings.get("version") != _SETTINGS_VERSION:
        raise ValueError(f"from_pretrained: unknown memory_ext settings version {settings.get('version')!r} in {path}")
    absent = [key for key in _REQUIRED if key not in settings]
    if absent:
        raise ValueError(f"from_pretrained: {path}'s memory_ext settings lack {absent}")
    keep_dtype = "dtype" not in kwargs and "torch_dtype" not in kwargs
    del config.memory_ext
    model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
    if device is not None:
        model.to(device)
    options = {key: settings[key] for key in _LAYER_OPTIONS if key in settings}
    ref = next(model.parameters())
    pool = MemoryValues(
        settings["n_keys"] ** 2,
        settings["value_dim"],
        dtype=getattr(torch, settings["value_dtype"]) if keep_dtype else ref.dtype,
        device=ref.device,
    )
    sizes = {key: settings[key] for key in ("n_keys", "heads", "k", "mode")}
    add_memory(model, settings["layers"], values=pool, **sizes, **options)
    _load_exact(model, _read_safetensors(path), keep_dtype, path)
    return model.eval()


def _read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    index = os.path.join(path, transformers.utils.SAFE_WEIGHTS_INDEX_NAME)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [transformers.utils.SAFE_WEIGHTS_NAME]
    missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise ValueError(f"from_pretrained: {path} lacks the safetensors files {missing} (saved with safe_serialization?)")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    return state


@torch.no_grad()
def _load_exact(model: nn.Module, state: dict[str, Tensor], keep_dtype: bool, path) -> None:
    """Copy ``state`` into the model; the keys save_pretrained left out must be tied to loaded ones."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    expected = set(model.state_dict())
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"from_pretrained: {path} holds weights the rebuilt model does not have: {unexpected[:8]}")
    loaded = {id(tensors[key]) for key in state}
    untied = sorted(key for key in expected - set(state) if id(tensors[key]) not in loaded)
    if untied:
        raise ValueError(f"from_pretrained: {path} lacks weights {untied[:8]} (and they are tied to none it has)")
    for key, value in state.items():
        target = tensors[key]
        if keep_dtype and target.dtype != value.dtype:
            # Parameter identity survives (tied weights stay tied); only its storage changes.
            target.data = target.data.to(value.dtype)
        target.copy_(value)

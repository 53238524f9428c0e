"""A compact Llama-style decoder, and the helper that puts memory layers into any model.

Blocks are pre-norm: x + attn(norm(x)), then x + ffn(norm(x)). Every block exposes its
feed-forward as ``block.ffn``, so :func:`swap_ffn` can replace it by a memory layer.
``Decoder.generate`` decodes with a :class:`KVCache`: the prompt runs once, then one token
per step, attention reading the cached keys and values and every FFN (memory layers
included, which are per-token) running on the new token only.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memory_ext.nn import MemoryValues, ProductKeyMemory

__all__ = ["DecoderConfig", "Decoder", "KVCache", "swap_ffn", "memory_placement", "flops_per_token"]


@dataclass
class DecoderConfig:
    """Sizes of a Decoder; ``memory_layers`` lists the blocks whose FFN is a memory layer."""

    vocab_size: int
    dim: int = 128
    n_layers: int = 6
    n_heads: int = 4
    ffn_dim: int | None = None  # SwiGLU hidden width; default 8/3 dim rounded up to 16
    max_seq_len: int = 256
    rope_base: float = 10000.0
    memory_layers: tuple[int, ...] = ()
    memory: dict = field(default_factory=dict)  # ProductKeyMemory keyword arguments

    @property
    def hidden(self) -> int:
        return self.ffn_dim or -(-8 * self.dim // 3 // 16) * 16


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on the two halves of the head dim; x: (batch, heads, seq, head_dim)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


class LayerKV:
    """One attention layer's cached keys and values: (batch, heads, max_len, head_dim)
    buffers, allocated at the first append in the dtype of what is appended, filled up to
    ``length``."""

    def __init__(self, max_len: int) -> None:
        self.max_len, self.length = max_len, 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v: (batch, heads, new, head_dim) -> every cached key and value, (batch, heads, length, head_dim)."""
        b, h, s, hd = k.shape
        if self.k is None:
            self.k = k.new_empty((b, h, self.max_len, hd))
            self.v = v.new_empty((b, h, self.max_len, hd))
        elif self.k.shape[0] != b:
            raise ValueError(f"KVCache: the cache holds a batch of {self.k.shape[0]} sequences, got {b}")
        end = self.length + s
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of the tokens a Decoder has seen, one :class:`LayerKV` per block,
    for at most ``max_len`` tokens per sequence (Decoder.new_cache makes one)."""

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.layers = [LayerKV(max_len) for _ in range(n_layers)]

    @property
    def length(self) -> int:
        """Tokens per sequence cached so far (the position of the next token)."""
        return self.layers[0].length if self.layers else 0


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions; (batch, seq, dim) -> same."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        if dim % n_heads or (dim // n_heads) % 2:
            raise ValueError(f"Attention: dim {dim} must split into {n_heads} heads of even width")
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerKV | None = None) -> Tensor:
        """x: (batch, seq, dim), cos/sin: (seq, head_dim / 2) at x's positions -> (batch, seq, dim).

        With ``cache``, x are the tokens after the cached ones: their keys and values are
        appended and the queries attend to every cached position and the causal part of x."""
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.append(k, v)
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif s == 1:  # one new token sees every position: no mask
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            # SDPA's is_causal aligns the mask top-left; new token i sees positions <= past + i.
            seen = torch.arange(past + s, device=x.device) <= torch.arange(past, past + s, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=seen)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    """Pre-norm transformer block; ``ffn`` is any (..., dim) -> (..., dim) module."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.n_heads)
        self.ffn: nn.Module = FeedForward(cfg.dim, cfg.hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerKV | None = None) -> Tensor:
        """x: (batch, seq, dim) -> same; ``cache``: this block's keys and values (see Attention)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.ffn(self.ffn_norm(x))


class Decoder(nn.Module):
    """Token ids (batch, seq) -> logits (batch, seq, vocab)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        half = cfg.dim // cfg.n_heads // 2
        freq = cfg.rope_base ** (-torch.arange(half, dtype=torch.float32) / half)
        angle = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), freq)
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)
        self.reset_parameters()
        # Built dense first, so a memory model's other weights equal the dense model's
        # from the same seed.
        if cfg.memory_layers:
            swap_ffn(self.layers, cfg.memory_layers, cfg.dim, **cfg.memory)

    def _check_tokens(self, tokens: Tensor, past: int = 0) -> None:
        # Shape, dtype and device are metadata: no host sync, constant under torch.compile.
        if tokens.dim() != 2:
            raise ValueError(f"Decoder: tokens must be 2-D (batch, seq), got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"Decoder: tokens must be int64 or int32 token ids, got dtype {tokens.dtype}")
        if tokens.device != self.embed.weight.device:
            raise ValueError(
                f"Decoder: tokens are on {tokens.device} but the model's parameters are on {self.embed.weight.device}"
            )
        if past == 0 and tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"Decoder: sequence length {tokens.shape[1]} exceeds max_seq_len {self.cfg.max_seq_len}"
            )
        if past and past + tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"Decoder: {past} cached tokens + {tokens.shape[1]} new exceed max_seq_len {self.cfg.max_seq_len}"
            )
        # The id range needs the values: read on the CPU only (elsewhere it would wait for
        # the device) and only in eager mode (under torch.compile it would be data-dependent).
        if tokens.device.type == "cpu" and tokens.numel() and not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(tokens)
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(
                    f"Decoder: token ids must be in [0, vocab_size = {self.cfg.vocab_size}), "
                    f"got ids from {int(lo)} to {int(hi)}"
                )

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights, residual projections scaled by (2 * n_layers)^-0.5, unit
        norm gains. Memory layers keep their own initialisation (ProductKeyMemory.reset_parameters)."""
        residual_std = 0.02 * (2 * self.cfg.n_layers) ** -0.5
        nn.init.normal_(self.embed.weight, 0.0, 0.02)
        nn.init.normal_(self.head.weight, 0.0, 0.02)
        for m in self.modules():
            if isinstance(m, nn.RMSNorm):
                m.reset_parameters()
            elif isinstance(m, (Attention, FeedForward)):
                for name, p in m.named_parameters():
                    nn.init.normal_(p, 0.0, residual_std if name in ("proj.weight", "w2.weight") else 0.02)

    def forward(self, tokens: Tensor, cache: KVCache | None = None) -> Tensor:
        """tokens: (batch, seq) int64/int32 in [0, vocab_size) -> logits (batch, seq, vocab_size).

        With ``cache`` (from :meth:`new_cache`), tokens continue the cached sequences: their
        positions start at ``cache.length``, and the cache grows by seq."""
        past = 0 if cache is None else self._check_cache(cache, tokens.shape[1] if tokens.dim() == 2 else 0)
        self._check_tokens(tokens, past)
        return self._run(tokens, cache)

    def _run(self, tokens: Tensor, cache: KVCache | None) -> Tensor:
        # forward without the input checks: generate's own tokens need none.
        x = self.embed(tokens)
        past, s = (0 if cache is None else cache.length), tokens.shape[1]
        # Rotary angles of the absolute positions past .. past + s - 1.
        cos, sin = self.cos[past : past + s].to(x.dtype), self.sin[past : past + s].to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else cache.layers[i])
        return self.head(self.norm(x))

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty KVCache for sequences of up to max_len tokens (default and at most max_seq_len)."""
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= self.cfg.max_seq_len:
            raise ValueError(f"Decoder.new_cache: max_len must be in [1, max_seq_len = {self.cfg.max_seq_len}], got {max_len}")
        return KVCache(len(self.layers), max_len)

    def _check_cache(self, cache: KVCache, new: int) -> int:
        """The cached length, after checking that cache belongs to this model's shape and has room for new tokens."""
        if not isinstance(cache, KVCache) or len(cache.layers) != len(self.layers):
            raise ValueError(f"Decoder: cache must be a KVCache of {len(self.layers)} layers (Decoder.new_cache), got {cache!r}")
        if cache.length + new > cache.max_len:
            raise ValueError(
                f"Decoder: the cache holds at most {cache.max_len} tokens per sequence; "
                f"{cache.length} cached + {new} new exceed it"
            )
        return cache.length

    @torch.no_grad()
    def generate(
        self,
        tokens: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """tokens: (batch, prompt) -> (batch, prompt + max_new_tokens): each prompt followed by its continuation.

        The prompts of a batch must have the same length (no padding or attention mask:
        prompts of different lengths go in separate calls), and prompt + max_new_tokens must
        fit max_seq_len. The prompt runs once through the model into a KV cache (prefill),
        then each step runs the last token alone, memory layers included. Temperature 0
        picks the most likely token (greedy; top_k is then ignored); otherwise tokens are
        drawn from softmax(logits / temperature) over the top_k most likely (all when None),
        with ``generator``'s random stream when given (reproducible). Runs in inference mode
        (no gradients) in the model's current train/eval mode (this model has no dropout,
        so both agree).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"Decoder.generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"Decoder.generate: temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"Decoder.generate: top_k must be None or an int >= 1, got {top_k!r}")
        if tokens.dim() == 2 and tokens.shape[1] == 0:
            raise ValueError("Decoder.generate: the prompt must hold at least one token, got shape "
                             f"{tuple(tokens.shape)}")
        if tokens.dim() == 2 and tokens.shape[1] + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(
                f"Decoder.generate: prompt length {tokens.shape[1]} + max_new_tokens {max_new_tokens} "
                f"exceeds max_seq_len {self.cfg.max_seq_len}"
            )
        self._check_tokens(tokens)
        if max_new_tokens == 0:
            return tokens.clone()
        # Inference mode skips the autograd layer of every op, a few microseconds each, which
        # no_grad keeps (the memory ops' autograd is Python: about 5 us a call). The result
        # is copied out of it, so callers get an ordinary tensor (usable in autograd).
        with torch.inference_mode():
            cache = self.new_cache(tokens.shape[1] + max_new_tokens)
            logits = self._run(tokens, cache)[:, -1]
            out = [tokens]
            for step in range(max_new_tokens):
                nxt = _pick(logits, temperature, top_k, generator).to(tokens.dtype)
                out.append(nxt)
                if step + 1 < max_new_tokens:
                    logits = self._run(nxt, cache)[:, -1]
            generated = torch.cat(out, dim=1)
        return generated.clone()


def _pick(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """logits: (batch, vocab) -> the next token of each row, (batch, 1) int64."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


def memory_placement(n_layers: int, count: int = 3) -> tuple[int, ...]:
    """Memory+ placement: ``count`` blocks centred with the widest even stride (24 layers -> 4, 12, 20)."""
    if not 1 <= count <= n_layers:
        raise ValueError(f"memory_placement: count must be in [1, {n_layers}], got {count}")
    return tuple(int((i + 0.5) * n_layers / count) for i in range(count))


def swap_ffn(
    blocks: Sequence[nn.Module],
    layers: Sequence[int],
    dim: int,
    *,
    attr: str = "ffn",
    values: MemoryValues | None = None,
    n_keys: int = 1024,
    value_dtype: torch.dtype | None = None,
    **memory_kwargs,
) -> MemoryValues:
    """Replace ``getattr(blocks[i], attr)`` for i in layers by ProductKeyMemory layers sharing one pool.

    Works for any model whose blocks hold their FFN as a submodule (``attr="mlp"`` for
    many). The pool is ``values``, or a new n_keys^2 x dim table on the blocks' device;
    it is returned. Other keyword arguments go to ProductKeyMemory.
    """
    device = next(blocks[layers[0]].parameters()).device
    if values is None:
        values = MemoryValues(n_keys * n_keys, dim, dtype=value_dtype, device=device)
    for i in layers:
        if not isinstance(getattr(blocks[i], attr, None), nn.Module):
            raise ValueError(f"swap_ffn: block {i} has no submodule {attr!r}")
        setattr(blocks[i], attr, ProductKeyMemory(dim, n_keys=n_keys, values=values, device=device, **memory_kwargs))
    return values


def flops_per_token(model: Decoder, seq_len: int) -> int:
    """Forward FLOPs per token: 2 per multiply-add of every matmul, attention over seq_len / 2
    keys on average, product-key scoring of both halves and the weighted bag of heads * k rows."""
    flops = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            flops += 2 * m.in_features * m.out_features
        elif isinstance(m, Attention):
            flops += 2 * 2 * model.cfg.dim * seq_len // 2
        elif isinstance(m, ProductKeyMemory):
            flops += 2 * m.heads * m.n_keys * m.k_dim + 2 * m.heads * m.k * m.values.dim
    return flops

"""A compact Llama-style decoder, and the helper that puts memory layers into any model.

Blocks are pre-norm: x + attn(norm(x)), then x + ffn(norm(x)). Every block exposes its
feed-forward as ``block.ffn``, so :func:`swap_ffn` can replace it by a memory layer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memory_ext.nn import MemoryValues, ProductKeyMemory

__all__ = ["DecoderConfig", "Decoder", "swap_ffn", "memory_placement", "flops_per_token"]


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


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions; (batch, seq, dim) -> same."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        if dim % n_heads or (dim // n_heads) % 2:
            raise ValueError(f"Attention: dim {dim} must split into {n_heads} heads of even width")
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    """Pre-norm transformer block; ``ffn`` is any (..., dim) -> (..., dim) module."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.n_heads)
        self.ffn: nn.Module = FeedForward(cfg.dim, cfg.hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
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

    def _check_tokens(self, tokens: Tensor) -> None:
        # Shape, dtype and device are metadata: no host sync, constant under torch.compile.
        if tokens.dim() != 2:
            raise ValueError(f"Decoder: tokens must be 2-D (batch, seq), got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"Decoder: tokens must be int64 or int32 token ids, got dtype {tokens.dtype}")
        if tokens.device != self.embed.weight.device:
            raise ValueError(
                f"Decoder: tokens are on {tokens.device} but the model's parameters are on {self.embed.weight.device}"
            )
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"Decoder: sequence length {tokens.shape[1]} exceeds max_seq_len {self.cfg.max_seq_len}"
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

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: (batch, seq) int64/int32 in [0, vocab_size) -> logits (batch, seq, vocab_size)."""
        self._check_tokens(tokens)
        x = self.embed(tokens)
        s = tokens.shape[1]
        cos, sin = self.cos[:s].to(x.dtype), self.sin[:s].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.head(self.norm(x))


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

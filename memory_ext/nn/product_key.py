"""Product-key memory layer (Lample et al. 2019) with the Memory+ output of "Memory Layers at
Scale" (Berges et al. 2024): the bag of values read is gated by silu(W1 x) and projected by W2."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memory_ext import ops
from memory_ext.nn.values import MemoryValues

__all__ = ["ProductKeyMemory"]


class ProductKeyMemory(nn.Module):
    """Memory layer: (..., dim) -> (..., dim), each token reading heads * k value rows.

    Per head, query = W_q x + b_q (k_dim wide, two halves); exact product-key top-k over
    n_keys^2 keys; fp32 softmax per head; weighted bag of the selected rows of ``values``
    (a shared :class:`MemoryValues`, or an own table of n_keys^2 rows when None); with
    ``swilu`` the output is W2 (y * silu(W1 x)). ``qk_norm`` RMS-normalises query halves
    (with a learnt gain) and sub-keys, and scales scores by k_dim^-0.5.
    """

    def __init__(
        self,
        dim: int,
        *,
        n_keys: int = 1024,
        heads: int = 4,
        k: int = 32,
        k_dim: int | None = None,
        values: MemoryValues | None = None,
        qk_norm: bool = True,
        swilu: bool = True,
        value_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if values is None:
            values = MemoryValues(n_keys * n_keys, dim, dtype=value_dtype, device=device)
        if values.n_rows != n_keys * n_keys:
            raise ValueError(
                f"ProductKeyMemory: values must have n_keys^2 = {n_keys * n_keys} rows, got {values.n_rows}"
            )
        v_dim = values.dim
        k_dim = v_dim // 2 if k_dim is None else k_dim
        if k_dim < 2 or k_dim % 2:
            raise ValueError(f"ProductKeyMemory: k_dim must be even and >= 2, got {k_dim}")
        if not 1 <= k <= n_keys:
            raise ValueError(f"ProductKeyMemory: k must be in [1, n_keys = {n_keys}], got {k}")
        if not swilu and v_dim != dim:
            raise ValueError(f"ProductKeyMemory: without swilu the value dim must equal dim {dim}, got {v_dim}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.n_keys, self.heads, self.k, self.k_dim = dim, n_keys, heads, k, k_dim
        self.values = values
        self.query = nn.Linear(dim, heads * k_dim, **factory)
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, k_dim // 2, **factory))
        # Only the query gets a gain: a key gain would multiply the same coordinates.
        self.query_gain = nn.Parameter(torch.empty(heads, 2, k_dim // 2, **factory)) if qk_norm else None
        self.gate = nn.Linear(dim, v_dim, **factory) if swilu else None  # W1
        self.out = nn.Linear(v_dim, dim, **factory) if swilu else None  # W2
        # Row read counts of the current statistics window (see memory_ext.nn.stats).
        self.usage: Tensor | None
        self.register_buffer("usage", None, persistent=False)
        # Normalised sub-keys reused without autograd (see _scoring_keys); not state.
        self._scoring_cache: tuple | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initialisation of Memory Layers at Scale: keys uniform in +-k_dim^-0.5 (scores of unit
        scale), the query Xavier-uniform, W1 and W2 normal(0, dim^-0.5); biases zero, query
        gains one. The (possibly shared) values are left alone."""
        nn.init.uniform_(self.keys, -self.k_dim**-0.5, self.k_dim**-0.5)
        nn.init.xavier_uniform_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        if self.query_gain is not None:
            nn.init.ones_(self.query_gain)
        for lin in (self.gate, self.out):
            if lin is not None:
                nn.init.normal_(lin.weight, 0.0, self.dim**-0.5)
                nn.init.zeros_(lin.bias)

    def _check_input(self, x: Tensor) -> None:
        # Metadata only (shape, dtype, device): no host sync, and constant under torch.compile.
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(
                f"ProductKeyMemory: input must have last dimension {self.dim} (the layer's dim), "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"ProductKeyMemory: input must be a floating-point tensor, got dtype {x.dtype}")
        if x.device != self.keys.device:
            raise ValueError(
                f"ProductKeyMemory: input is on {x.device} but the layer's parameters are on {self.keys.device}"
            )

    def lookup(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (tokens, dim) -> indices (tokens, heads * k) int64, weights (tokens, heads * k) fp32
        (fp64 for fp64 parameters)."""
        self._check_input(x)
        if x.dim() != 2:
            raise ValueError(f"ProductKeyMemory.lookup: input must be 2-D (tokens, dim), got shape {tuple(x.shape)}")
        return self._lookup(x)

    def _lookup(self, x: Tensor) -> tuple[Tensor, Tensor]:
        tokens, half = x.shape[0], self.k_dim // 2
        keys, gain = self.keys, self.query_gain  # each module attribute read once a call
        # The ops do not autocast: score in the keys' dtype (fp32 parameters under autocast).
        query = self.query(x)
        if query.dtype != keys.dtype:
            query = query.to(keys.dtype)
        query = query.view(tokens, self.heads, 2, half)
        if gain is not None:
            keys, scale = self._scoring_keys(keys, gain)
            query = F.rms_norm(query, (half,)) * scale
            if query.dtype != keys.dtype:
                query = query.to(keys.dtype)
        scores, indices = ops.pk_topk(query.reshape(tokens, self.heads, self.k_dim), keys, self.k)
        weights = torch.softmax(scores, dim=-1)  # fp32 scores (fp64 for fp64 inputs)
        return indices.view(tokens, self.heads * self.k), weights.view(tokens, self.heads * self.k)

    def _normalised_keys(self, keys: Tensor, gain: Tensor) -> tuple[Tensor, Tensor]:
        """qk_norm's RMS-normalised sub-keys and query scale (gain * k_dim^-0.5)."""
        return F.rms_norm(keys, (keys.shape[-1],)).to(keys.dtype), gain * self.k_dim**-0.5

    def _scoring_keys(self, keys: Tensor, gain: Tensor) -> tuple[Tensor, Tensor]:
        """_normalised_keys, reused while the parameters do not change.

        Both depend on the parameters only, yet normalising every sub-key costs as much as
        scoring one token against them: at decode time (a few tokens a call) it was half of
        the lookup. Without autograd they are kept and reused until keys or query_gain
        change (another tensor, other storage, or an in-place update, which bumps the
        version counter); the same function, so the same bits."""
        differentiable = torch.is_grad_enabled() and (keys.requires_grad or gain.requires_grad)
        if differentiable or torch.compiler.is_compiling() or keys.is_inference() or gain.is_inference():
            return self._normalised_keys(keys, gain)
        # The tensors themselves are held (compared by identity), so their storage cannot
        # be reused by another while the cache stands.
        stamp = (keys.data_ptr(), keys._version, gain.data_ptr(), gain._version,
                 torch.is_autocast_enabled(keys.device.type))
        cached = self._scoring_cache
        if cached is None or cached[0] is not keys or cached[1] is not gain or cached[2] != stamp:
            # Ordinary tensors even when first asked for in inference mode: a later grad-mode
            # forward (frozen keys, trained values) saves them for its backward.
            with torch.inference_mode(False), torch.no_grad():
                normed, scale = self._normalised_keys(keys, gain)
            cached = self._scoring_cache = (keys, gain, stamp, normed, scale)
        return cached[3], cached[4]

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., dim) -> (..., dim)."""
        self._check_input(x)
        flat = x.reshape(-1, self.dim)
        indices, weights = self._lookup(flat)
        if self.usage is not None:
            self.usage.index_add_(0, indices.reshape(-1), indices.new_ones(()).expand(indices.numel()))
        # The top-k of an n_keys^2 table is in range by construction (the pool's size is
        # checked in __init__): no index check, so no host synchronisation on CUDA.
        y = self.values(indices, weights, check_indices=False)
        if self.gate is None:
            return y.to(x.dtype).view(x.shape)
        return self.out(y * F.silu(self.gate(flat))).view(x.shape)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, n_keys={self.n_keys}, heads={self.heads}, k={self.k}, k_dim={self.k_dim}, "
            f"qk_norm={self.query_gain is not None}, swilu={self.gate is not None}"
        )

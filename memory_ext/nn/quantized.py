"""Row-wise quantized value tables for inference: uint8 rows with a float32 scale and bias each,
or float8 e4m3 rows with a float32 scale each, read by memory.quantized_embedding_bag.

A row is stored packed, its codes then its scale (and bias): one contiguous read per lookup,
the layout of torch.ops.quantized.embedding_bag_byte_prepack for uint8 (FBGEMM's serving
format). uint8 rows map [min, max] of the row onto 0..255 (scale = (max - min) / 255, bias =
min; error at most scale / 2 per element); e4m3 rows scale the row's largest magnitude to
448, e4m3's largest finite value (3 mantissa bits: relative error at most 2^-4).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from memory_ext import ops
from memory_ext._checks import QUANTIZED_ROW_TAIL_BYTES
from memory_ext.nn.product_key import ProductKeyMemory
from memory_ext.nn.values import MemoryValues

__all__ = ["quantize_rows", "dequantize_rows", "QuantizedMemoryValues", "quantize_values", "CODES"]

CODES = tuple(QUANTIZED_ROW_TAIL_BYTES)  # "uint8", "float8_e4m3fn"
_E4M3_MAX = 448.0
# Rows quantized at a time: bounds the float temporaries to a few MiB per 1024 columns.
_CHUNK_ROWS = 1 << 14


def _tail_bytes(codes: str, caller: str) -> int:
    if codes not in QUANTIZED_ROW_TAIL_BYTES:
        raise ValueError(f'{caller}: codes must be "uint8" or "float8_e4m3fn", got {codes!r}')
    return QUANTIZED_ROW_TAIL_BYTES[codes]


def _floats_as_bytes(x: Tensor) -> Tensor:
    """(rows,) float32 -> (rows, 4) uint8, the bytes of each value in memory order."""
    return x.contiguous().view(torch.uint8).view(-1, 4)


def _quantize_chunk(rows: Tensor, codes: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """(r, dim) float32 -> codes (r, dim) uint8 bits, scale (r,), bias (r,) or None."""
    if codes == "uint8":
        lo, hi = rows.aminmax(dim=1)
        scale = (hi - lo) / 255.0
        # A constant row has scale 0: every code is 0 and the bias alone gives it back.
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((rows - lo[:, None]) / safe[:, None]).clamp_(0, 255).to(torch.uint8)
        return q, scale, lo
    amax = rows.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / _E4M3_MAX, torch.ones_like(amax))
    # Rounding may carry a quotient just past 448, which e4m3fn (no infinity) would make NaN.
    q = (rows / scale[:, None]).clamp_(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(torch.uint8), scale, None


def quantize_rows(table: Tensor, codes: str = "uint8") -> Tensor:
    """(rows, dim) float table -> (rows, dim + 8) uint8 for "uint8", (rows, dim + 4) for "float8_e4m3fn".

    Each packed row is its codes, then its float32 scale (and bias for uint8). The table is
    quantized from float32 (a float64 table is rounded to float32 first), a chunk of rows at
    a time; it must be finite.
    """
    tail = _tail_bytes(codes, "quantize_rows")
    if table.dim() != 2 or not table.is_floating_point():
        raise ValueError(f"quantize_rows: table must be a 2-D float tensor (rows, dim), got {table.dtype} "
                         f"of shape {tuple(table.shape)}")
    n_rows, dim = table.shape
    packed = ops.advise_huge_pages(torch.empty(n_rows, dim + tail, dtype=torch.uint8, device=table.device))
    with torch.no_grad():
        for start in range(0, n_rows, _CHUNK_ROWS):
            rows = table[start:start + _CHUNK_ROWS].float()
            finite = torch.isfinite(rows).all(dim=1)
            if not bool(finite.all()):
                bad = start + int((~finite).nonzero()[0, 0])
                raise ValueError(f"quantize_rows: the table holds a non-finite value (NaN or inf) in row {bad}")
            q, scale, bias = _quantize_chunk(rows, codes)
            out = packed[start:start + rows.shape[0]]
            out[:, :dim] = q
            out[:, dim:dim + 4] = _floats_as_bytes(scale)
            if bias is not None:
                out[:, dim + 4:] = _floats_as_bytes(bias)
    return packed


def dequantize_rows(packed: Tensor, codes: str = "uint8") -> Tensor:
    """(rows, dim + tail) packed rows -> (rows, dim) float32: scale * code (+ bias), exactly as the kernel reads them."""
    tail = _tail_bytes(codes, "dequantize_rows")
    if packed.dim() != 2 or packed.dtype != torch.uint8 or packed.shape[1] < tail:
        raise ValueError(f"dequantize_rows: packed must be (rows, dim + {tail}) uint8 for {codes} codes, got "
                         f"{packed.dtype} of shape {tuple(packed.shape)}")
    dim = packed.shape[1] - tail
    q = packed[:, :dim].contiguous()
    values = q.float() if codes == "uint8" else q.view(torch.float8_e4m3fn).float()
    scale = packed[:, dim:dim + 4].contiguous().view(torch.float32)
    out = values * scale
    if codes == "uint8":
        out = out + packed[:, dim + 4:].contiguous().view(torch.float32)
    return out


class QuantizedMemoryValues(nn.Module):
    """A value table for inference, row-wise quantized: ``packed`` (n_rows, dim + tail) uint8.

    Takes a MemoryValues' place in a ProductKeyMemory (same ``forward(indices, weights)``,
    ``n_rows`` and ``dim``); forward only. ``out_dtype`` (float32, bfloat16 or float16) is
    the dtype of the bags it returns, accumulated in float32. Build one with
    :meth:`from_values` or :func:`quantize_values`; its state_dict holds ``packed`` and the
    format (codes, out_dtype), which loading checks.
    """

    def __init__(self, packed: Tensor, codes: str = "uint8", *, out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        tail = _tail_bytes(codes, "QuantizedMemoryValues")
        if packed.dim() != 2 or packed.dtype != torch.uint8 or packed.shape[1] <= tail or packed.shape[0] == 0:
            raise ValueError(f"QuantizedMemoryValues: packed must be (n_rows, dim + {tail}) uint8 with n_rows and "
                             f"dim positive, got {packed.dtype} of shape {tuple(packed.shape)}")
        if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"QuantizedMemoryValues: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
        self.codes, self.out_dtype = codes, out_dtype
        self.n_rows, self.dim = packed.shape[0], packed.shape[1] - tail
        self.register_buffer("packed", packed)

    @classmethod
    def from_values(
        cls, values: MemoryValues | Tensor, codes: str = "uint8", *, out_dtype: torch.dtype | None = None
    ) -> QuantizedMemoryValues:
        """Quantize a trained table (a MemoryValues or its (n_rows, dim) weight).

        out_dtype defaults to the table's dtype (float32 for a float64 table).
        """
        if isinstance(values, MemoryValues) and values.sharded:
            raise ValueError(f"QuantizedMemoryValues.from_values: a table sharded over a process group cannot be "
                             f"quantized here (got {type(values).__name__}); gather it to one rank first")
        table = values.weight if isinstance(values, MemoryValues) else values
        if out_dtype is None:
            out_dtype = table.dtype if table.dtype in (torch.bfloat16, torch.float16) else torch.float32
        return cls(quantize_rows(table.detach(), codes), codes, out_dtype=out_dtype)

    def forward(self, indices: Tensor, weights: Tensor, *, check_indices: bool = True) -> Tensor:
        """indices: (tokens, bag) int64/int32; weights: (tokens, bag) -> (tokens, dim) out_dtype.

        check_indices as for MemoryValues.forward."""
        return ops.quantized_embedding_bag(
            self.packed, indices, weights.float(), self.codes, self.out_dtype, check_indices=check_indices
        )

    def dequantize(self) -> Tensor:
        """The (n_rows, dim) float32 table the lookups read."""
        return dequantize_rows(self.packed, self.codes)

    def get_extra_state(self) -> dict:
        return {"codes": self.codes, "out_dtype": str(self.out_dtype).removeprefix("torch."), "dim": self.dim}

    def set_extra_state(self, state: dict) -> None:
        if state.get("codes") != self.codes or state.get("dim") != self.dim:
            raise ValueError(f"QuantizedMemoryValues: the state_dict holds {state.get('codes')} rows of dim "
                             f"{state.get('dim')}, this table {self.codes} rows of dim {self.dim}")
        self.out_dtype = getattr(torch, state["out_dtype"])

    def extra_repr(self) -> str:
        return f"{self.n_rows}, {self.dim}, codes={self.codes}, out_dtype={self.out_dtype}"


def quantize_values(
    model: nn.Module, codes: str = "uint8", *, out_dtype: torch.dtype | None = None
) -> list[QuantizedMemoryValues]:
    """Replace the value table of every ProductKeyMemory in ``model`` by its quantized form, in place.

    A pool shared by several layers becomes one QuantizedMemoryValues shared the same way.
    Returns the new tables (one per distinct pool). The float tables are released when
    nothing else holds them. For inference: the quantized tables have no gradient.
    """
    _tail_bytes(codes, "quantize_values")
    layers = [m for m in model.modules() if isinstance(m, ProductKeyMemory)]
    if not layers:
        raise ValueError(f"quantize_values: {type(model).__name__} holds no ProductKeyMemory layer")
    done: dict[int, QuantizedMemoryValues] = {}
    for layer in layers:
        values = layer.values
        if isinstance(values, QuantizedMemoryValues):
            continue
        if id(values) not in done:
            done[id(values)] = QuantizedMemoryValues.from_values(values, codes, out_dtype=out_dtype)
        layer.values = done[id(values)]
    return list(done.values())

"""Value tables in safetensors files, opened memory-mapped: a table larger than RAM serves on the CPU.

A file holds one 2-D tensor (the table, key ``"weight"`` by default) in the safetensors
layout: an 8-byte little-endian header length, a JSON header giving dtype, shape and byte
offsets, then the raw rows. ``save_values`` pads the header so that the rows start on a
4096-byte boundary (a page: the mapping needs no realignment, and the CUDA gather's 16-byte
vector loads apply to a host-registered table); files written by other safetensors writers
load too, as long as the table's offset is a multiple of its element size.

``load_values(path, mmap=True)`` maps the file copy-on-write (MAP_PRIVATE) and reads only the
header: the table's storage is the file's pages, which the kernel reads when a lookup first
touches them. Training such a table works and never changes the file: each page written
(a row updated by an optimizer, a ``load_state_dict``) becomes a private copy in RAM, so a
sparse row optimizer costs RAM in proportion to the rows it updates (plus its own state),
while a dense optimizer copies the whole table into RAM. ``save_values`` writes a new file
(through a temporary file and a rename, so saving over the mapped file itself is safe).
"""
from __future__ import annotations

import json
import math
import mmap as _mmap
import os
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from memory_ext import ops
from memory_ext.nn.optim import value_tables
from memory_ext.nn.values import MemoryValues

__all__ = ["ValuesFileInfo", "read_values_header", "write_values_file", "save_values", "load_values", "load_pool_"]

# The safetensors dtype names of the value tables' dtypes.
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_NAMES = {v: k for k, v in _DTYPES.items()}
# Other dtypes a safetensors file may hold: named in the error, never loaded as values.
_OTHER_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"}
_ALIGN = 4096  # rows start on a page boundary in files save_values writes
_MAX_HEADER = 100_000_000  # the safetensors format's own bound on the header
_CHUNK_BYTES = 64 << 20  # rows are written and copied in chunks of this size: no full extra copy in RAM


@dataclass(frozen=True)
class ValuesFileInfo:
    """Where a value table lies in its file: rows x dim of dtype, starting ``offset`` bytes in."""

    path: str
    key: str
    n_rows: int
    dim: int
    dtype: torch.dtype
    offset: int

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.dim * self.dtype.itemsize


def read_values_header(path: str | os.PathLike, *, key: str = "weight") -> ValuesFileInfo:
    """The table ``key`` of a safetensors file: its shape, dtype and byte offset (reads the header only)."""
    return _read_header(path, key, "read_values_header")


def _read_header(path: str | os.PathLike, key: str, who: str) -> ValuesFileInfo:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{who}: no value-table file at {path!r}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if hasattr(os, "posix_fadvise"):
            # The header is all that is read: no readahead of the rows behind it.
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{who}: {path!r} is not a safetensors file (only {size} bytes, no header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(
                f"{who}: {path!r} is not a safetensors file (header length {n} does not fit its {size} bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{who}: {path!r} is not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{who}: {path!r} is not a safetensors file (its header is not a JSON object)")
    names = sorted(k for k in header if k != "__metadata__")
    if key not in names:
        shown = ", ".join(repr(k) for k in names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(
            f"{who}: {path!r} is not a value table: it holds no tensor {key!r} (its tensors: {shown or 'none'})"
        )
    entry = header[key]
    try:
        dtype_name, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{who}: {path!r} has a malformed entry for {key!r}: {entry!r}") from None
    if dtype_name not in _DTYPES:
        kind = "a dtype value tables do not use" if dtype_name in _OTHER_DTYPES else "an unknown dtype"
        raise ValueError(
            f"{who}: tensor {key!r} of {path!r} has {kind}, {dtype_name!r}; value tables are "
            f"{', '.join(_DTYPES)} (float32, bfloat16, float16, float64)"
        )
    if len(shape) != 2 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"{who}: {path!r} is not a value table: tensor {key!r} has shape {shape}, not (n_rows > 0, dim > 0)")
    dtype = _DTYPES[dtype_name]
    offset = 8 + n + begin
    if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{who}: tensor {key!r} of {path!r} has data offsets {entry['data_offsets']} that do not "
                         f"match its shape {shape} and dtype {dtype_name}")
    if 8 + n + end > size:
        raise ValueError(f"{who}: {path!r} is truncated: tensor {key!r} ends at byte {8 + n + end}, the file has {size}")
    if offset % dtype.itemsize:
        raise ValueError(f"{who}: tensor {key!r} of {path!r} starts at byte {offset}, not a multiple of its "
                         f"{dtype.itemsize}-byte elements; rewrite it with memory_ext.nn.save_values")
    return ValuesFileInfo(path, key, shape[0], shape[1], dtype, offset)


def write_values_file(
    path: str | os.PathLike, n_rows: int, dim: int, dtype: torch.dtype, chunks: Iterable[Tensor], *, key: str = "weight"
) -> None:
    """Write a (n_rows, dim) table given as row chunks (each (rows_i, dim) of dtype, any device) to a safetensors file.

    For tables too large to hold twice: only one chunk is in RAM at a time. Written to a
    temporary file beside path, then renamed over it (a mapping of the old file stays valid)."""
    who = "write_values_file"
    if dtype not in _NAMES:
        raise ValueError(f"{who}: value tables are float32, bfloat16, float16 or float64, got {dtype}")
    if n_rows <= 0 or dim <= 0:
        raise ValueError(f"{who}: n_rows and dim must be positive, got {n_rows} and {dim}")
    _check_little_endian(who)
    path = os.fspath(path)
    nbytes = n_rows * dim * dtype.itemsize
    entry = {"dtype": _NAMES[dtype], "shape": [n_rows, dim], "data_offsets": [0, nbytes]}
    header = json.dumps({"__metadata__": {"format": "pt", "content": "memory_ext.values"}, key: entry}).encode()
    # Trailing spaces (which the format allows) put the rows on a page boundary.
    header += b" " * (-(8 + len(header)) % _ALIGN)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            written = 0
            for chunk in chunks:
                if chunk.dim() != 2 or chunk.shape[1] != dim or chunk.dtype != dtype:
                    raise ValueError(f"{who}: chunks must be (rows, {dim}) {dtype}, got {tuple(chunk.shape)} {chunk.dtype}")
                written += chunk.shape[0]
                if written > n_rows:
                    raise ValueError(f"{who}: the chunks hold more than n_rows = {n_rows} rows")
                host = chunk.detach().to("cpu").contiguous()
                f.write(memoryview(host.view(torch.uint8).numpy()))
            if written != n_rows:
                raise ValueError(f"{who}: the chunks hold {written} rows, n_rows is {n_rows}")
            # On disk before the rename: a crash then leaves the old file or the whole new
            # one, never a renamed file whose rows were still in the page cache.
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _copy_rows(dst: Tensor, src: Tensor) -> None:
    """dst.copy_(src) a chunk of rows at a time: a mapped src is read in order, and no
    full-size temporary is made on the way to another device."""
    for d, s in zip(_row_chunks(dst), _row_chunks(src), strict=True):
        d.copy_(s)


def _row_chunks(table: Tensor) -> Iterator[Tensor]:
    step = max(1, _CHUNK_BYTES // (table.shape[1] * table.element_size()))
    for start in range(0, table.shape[0], step):
        yield table[start : start + step]


def save_values(values: MemoryValues | Tensor, path: str | os.PathLike, *, key: str = "weight") -> None:
    """Write a table (a MemoryValues or its (n_rows, dim) weight) to a safetensors file that load_values maps."""
    who = "save_values"
    if isinstance(values, MemoryValues):
        if values.sharded:
            raise ValueError(f"{who}: a table sharded over a process group holds only its columns on each rank; "
                             "gather it first (save each rank's shard with its weight tensor if that is what you mean)")
        values = values.weight
    if not isinstance(values, Tensor) or values.dim() != 2:
        raise ValueError(f"{who}: expected a MemoryValues or a 2-D (n_rows, dim) tensor, got {_describe(values)}")
    write_values_file(path, values.shape[0], values.shape[1], values.dtype, _row_chunks(values), key=key)


def load_values(
    path: str | os.PathLike,
    *,
    key: str = "weight",
    mmap: bool = True,
    device: torch.device | str | None = None,
) -> MemoryValues:
    """A MemoryValues whose (n_rows, dim) table is tensor ``key`` of a safetensors file.

    mmap=True (CPU only): the table's storage is the file's pages, mapped copy-on-write;
    nothing but the header is read now, lookups read the pages they touch, and writes stay
    private (see the module docstring). mmap=False: the table is read into a new tensor on
    ``device`` (default CPU), chunk by chunk."""
    return _load(path, key, mmap, device, "load_values")


def _load(path: str | os.PathLike, key: str, mmap: bool, device: torch.device | str | None, who: str) -> MemoryValues:
    info = _read_header(path, key, who)
    target = torch.device("cpu" if device is None else device)
    if mmap and target.type != "cpu":
        raise ValueError(f"{who}: mmap=True maps the file into CPU memory, got device={device!r}; use mmap=False "
                         "to copy the table to that device, or memory_ext.nn.cuda_host_values to read it from the GPU")
    mapped = _map(info, random_access=mmap)
    if mmap:
        table = mapped
    else:
        table = ops.advise_huge_pages(torch.empty(info.n_rows, info.dim, dtype=info.dtype, device=target))
        _copy_rows(table, mapped)
        del mapped
    return _wrap(table)


def load_pool_(
    target: nn.Module, path: str | os.PathLike, *, key: str = "weight", mmap: bool = True
) -> MemoryValues:
    """Point the value table of target (a MemoryValues, or a model with one pool) at a file; returns the pool.

    The pool's shape and dtype must be the file's. mmap=True replaces the pool's weight by
    the mapped table (a new Parameter: build optimizers afterwards); every layer sharing the
    pool reads the file. mmap=False copies the file into the existing weight in place."""
    who = "load_pool_"
    pool = _only_pool(target, who)
    info = _read_header(path, key, who)
    weight = pool.weight
    if (info.n_rows, info.dim) != tuple(weight.shape):
        raise ValueError(f"{who}: {info.path!r} holds a ({info.n_rows}, {info.dim}) table but the pool is "
                         f"{tuple(weight.shape)} (n_rows, dim)")
    if info.dtype != weight.dtype:
        raise ValueError(f"{who}: {info.path!r} holds {info.dtype} rows but the pool is {weight.dtype}; "
                         "save the table in the pool's dtype (or convert the model) first")
    if pool.fused is not None:
        raise ValueError(f"{who}: the pool is fused to an optimizer that holds its current weight; unfuse() first")
    if not mmap:
        if weight.device.type == "meta":
            raise ValueError(f"{who}: the pool is on the meta device (no storage to copy into); use mmap=True")
        with torch.no_grad():
            _copy_rows(weight, _map(info, random_access=False))
        return pool
    if weight.device.type not in ("cpu", "meta"):
        raise ValueError(f"{who}: mmap=True maps the file into CPU memory but the pool is on {weight.device}; "
                         "use mmap=False, or memory_ext.nn.cuda_host_values to read a host table from the GPU")
    pool.weight = nn.Parameter(_map(info, random_access=True), requires_grad=weight.requires_grad)
    return pool


def _only_pool(target: nn.Module, who: str) -> MemoryValues:
    pools = value_tables(target)  # a MemoryValues is its own only table
    if len(pools) != 1:
        raise ValueError(f"{who}: expected a MemoryValues or a model with exactly one value pool, got "
                         f"{type(target).__name__} with {len(pools)}; pass the pool itself")
    if pools[0].sharded:
        raise ValueError(f"{who}: a table sharded over a process group cannot be loaded from one file")
    return pools[0]


def _map(info: ValuesFileInfo, *, random_access: bool) -> Tensor:
    """The table of info as a CPU tensor over a private (copy-on-write) mapping of the whole file."""
    _check_little_endian("load_values")
    with open(info.path, "rb") as f:
        # The mapping keeps the file open; closing f does not unmap it.
        mapping = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_COPY)
    if hasattr(mapping, "madvise"):
        # Lookups read rows at random: reading around each touched page would read rows
        # nobody asked for. A full copy (mmap=False) reads in order and wants the readahead.
        mapping.madvise(_mmap.MADV_RANDOM if random_access else _mmap.MADV_SEQUENTIAL)  # both exist where madvise does
    # frombuffer keeps the mapping alive as long as the tensor (or a view of it) lives.
    flat = torch.frombuffer(mapping, dtype=info.dtype, count=info.n_rows * info.dim, offset=info.offset)
    return flat.view(info.n_rows, info.dim)


def _wrap(table: Tensor) -> MemoryValues:
    """A MemoryValues over an existing (n_rows, dim) table, built without allocating or initialising one."""
    # Built on the meta device (no memory, no init work), then given the real table, so
    # that every attribute MemoryValues.__init__ sets is set.
    values = MemoryValues(table.shape[0], table.shape[1], dtype=table.dtype, device="meta")
    values.weight = nn.Parameter(table)
    return values


def _check_little_endian(who: str) -> None:
    if sys.byteorder != "little":
        raise RuntimeError(f"{who}: safetensors files are little-endian and this machine is not")


def _describe(x) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__

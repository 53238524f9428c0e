"""Value tables in host memory read by CUDA kernels: the GPU serves a table larger than its memory.

``cuda_host_view(table)`` registers a CPU table's exact bytes with ``cudaHostRegister``
(page-locked and mapped into the GPU's address space; ``Tensor.pin_memory()`` would copy the
table into a new allocation rounded up to a power of two) and returns a CUDA tensor over
the same memory. On Linux x86-64 every GPU memory_ext builds for (sm_80, sm_90) uses
unified virtual addressing and reads registered host memory at its host address, so the
CUDA tensor's data pointer is the host pointer, and ``torch.ops.memory.embedding_bag`` reads
the rows it gathers over PCIe or NVLink, a row at a time, with no copy of the table.

The host rows are pinned while the view lives, so the table must fit in host RAM (a
file-mapped table is read in full when registered, and its pages become private copies);
it need not fit in GPU memory. The registration ends (after a device synchronisation) when
the last view is freed. The gather kernel's 16-byte vector loads need the table's start
16-byte aligned (torch's CPU allocations are 64-byte aligned; ``save_values`` files put the
rows on a page boundary); otherwise it takes its scalar path, correct but slower.

Status: written against the CUDA runtime's documented behaviour, not yet run on a GPU.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from memory_ext.nn.file_values import _only_pool
from memory_ext.nn.values import MemoryValues

__all__ = ["cuda_host_view", "cuda_host_values"]

# cudaHostRegister flags: Portable (every device sees the registration), Mapped (device
# addressable). Not ReadOnly: a training step on the view writes host rows, which a
# read-only registration would turn into a device fault.
_HOST_REGISTER_PORTABLE, _HOST_REGISTER_MAPPED = 1, 2

# __cuda_array_interface__ type strings; bfloat16 has none and travels as int16.
_TYPESTR = {
    torch.float32: "<f4", torch.float64: "<f8", torch.float16: "<f2", torch.bfloat16: "<i2",
    torch.int8: "|i1", torch.uint8: "|u1", torch.int16: "<i2", torch.int32: "<i4", torch.int64: "<i8",
}


class _HostRegistration:
    """A registered host range exposed through ``__cuda_array_interface__``; holds the host
    tensor, and unregisters the range when the last CUDA tensor over it is freed."""

    def __init__(self, table: Tensor, typestr: str) -> None:
        self.__cuda_array_interface__ = {
            "shape": tuple(table.shape), "typestr": typestr, "data": (table.data_ptr(), False),
            "strides": None, "version": 2,
        }
        # The finalizer holds the host tensor, so the pages outlive every CUDA view of them.
        self._finalizer = weakref.finalize(self, _unregister, table.data_ptr(), table)
        self._finalizer.atexit = False  # at exit the CUDA context goes first; nothing to undo


def _unregister(ptr: int, table: Tensor) -> None:
    # Kernels queued on any stream may still read the rows: wait for them first.
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaHostUnregister(ptr)


def cuda_host_view(table: Tensor, device: torch.device | str | None = None) -> Tensor:
    """table: contiguous CPU tensor -> a CUDA tensor of the same shape and dtype over the same host memory.

    The exact ``table.nbytes`` are registered (no rounding); the view keeps ``table`` alive.
    Registering the same memory twice fails (CUDA refuses): make one view and share it."""
    who = "cuda_host_view"
    if not isinstance(table, Tensor) or table.device.type != "cpu":
        where = table.device if isinstance(table, Tensor) else type(table).__name__
        raise ValueError(f"{who}: expected a CPU tensor (the host table), got {where}")
    if not table.is_contiguous() or table.numel() == 0:
        raise ValueError(f"{who}: the table must be contiguous and non-empty, got shape {tuple(table.shape)} "
                         f"with strides {table.stride()}")
    if table.dtype not in _TYPESTR:
        raise ValueError(f"{who}: unsupported dtype {table.dtype}")
    target = torch.device("cuda" if device is None else device)
    if target.type != "cuda":
        raise ValueError(f"{who}: device must be a CUDA device, got {device!r}")
    if not torch.cuda.is_available():
        raise RuntimeError(f"{who}: CUDA is not available (no GPU visible, or torch built without CUDA); "
                           "a host table can only be read by a GPU")
    table = table.detach()
    flags = _HOST_REGISTER_PORTABLE | _HOST_REGISTER_MAPPED
    with torch.cuda.device(target):
        status = torch.cuda.cudart().cudaHostRegister(table.data_ptr(), table.nbytes, flags)
        try:
            torch.cuda.check_error(status)
        except torch.cuda.CudaError as e:
            raise RuntimeError(f"{who}: cudaHostRegister of {table.nbytes} bytes at {table.data_ptr():#x} "
                               f"failed: {e}") from None
        typestr = _TYPESTR[table.dtype]
        view = torch.as_tensor(_HostRegistration(table, typestr), device=target)
    return view.view(table.dtype)  # bfloat16 arrives as int16


def cuda_host_values(target: nn.Module, device: torch.device | str | None = None) -> MemoryValues:
    """Make the value pool of target (a MemoryValues, or a model with one pool) a CUDA view of its CPU table.

    Call it while the pool is on the CPU (e.g. mapped from a file, or loaded with
    mmap=False), then move the model: ``model.cuda()`` leaves a pool already on the GPU
    where it is, so it keeps reading host memory. The pool's weight becomes a new
    Parameter: build optimizers afterwards. Returns the pool."""
    pool = _only_pool(target, "cuda_host_values")
    weight = pool.weight
    if weight.device.type != "cpu":
        raise ValueError(f"cuda_host_values: the pool must be on the CPU (the host table), got {weight.device}")
    if pool.fused is not None:
        raise ValueError("cuda_host_values: the pool is fused to an optimizer that holds its current weight; unfuse() first")
    pool.weight = nn.Parameter(cuda_host_view(weight, device), requires_grad=weight.requires_grad)
    return pool

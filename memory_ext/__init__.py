"""memory_ext: product-key memory layers for PyTorch.

Importing loads the compiled operator library (``torch.ops.memory.*``), then the Python
side of the ops (fake kernels, autograd), then the public API. It never initialises CUDA.
"""
import torch  # noqa: F401  (loads libc10/libtorch before our library)

from memory_ext import (
    _C,  # noqa: F401  (registers torch.ops.memory.*)
    ops,
)
from memory_ext._version import __version__
from memory_ext.nn import (
    MemoryValues,
    ProductKeyMemory,
    clip_grad_norms,
    memory_usage,
    param_groups,
    track_usage,
)
from memory_ext.ops import embedding_bag, embedding_bag_backward, pk_topk, rows_to_dense


def cuda_kernels_built() -> bool:
    """True when this build compiled the CUDA kernels (independent of a visible GPU)."""
    return bool(_C.with_cuda)


__all__ = [
    "__version__",
    "ops",
    "embedding_bag",
    "embedding_bag_backward",
    "pk_topk",
    "rows_to_dense",
    "cuda_kernels_built",
    "MemoryValues",
    "ProductKeyMemory",
    "param_groups",
    "clip_grad_norms",
    "track_usage",
    "memory_usage",
]

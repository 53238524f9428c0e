"""The layers users put in models: value pools, product-key memory, their recipe and statistics."""
from memory_ext.nn.optim import clip_grad_norms, param_groups, sparse_value_optimizer, value_parameters
from memory_ext.nn.product_key import ProductKeyMemory
from memory_ext.nn.sparse_adam import SparseRowAdam
from memory_ext.nn.stats import memory_usage, track_usage, usage_from_counts
from memory_ext.nn.values import MemoryValues

__all__ = [
    "MemoryValues",
    "ProductKeyMemory",
    "param_groups",
    "clip_grad_norms",
    "value_parameters",
    "sparse_value_optimizer",
    "SparseRowAdam",
    "track_usage",
    "memory_usage",
    "usage_from_counts",
]

"""The layers users put in models: value pools, product-key memory, their recipe and statistics."""
from memory_ext.nn.fused import FusedRowUpdate
from memory_ext.nn.optim import clip_grad_norms, param_groups, value_optimizer, value_parameters, value_tables
from memory_ext.nn.product_key import ProductKeyMemory
from memory_ext.nn.row_adagrad import SparseRowAdagrad
from memory_ext.nn.row_optimizer import RowOptimizer
from memory_ext.nn.sparse_adam import SparseRowAdam
from memory_ext.nn.stats import memory_usage, track_usage, usage_from_counts
from memory_ext.nn.values import MemoryValues

__all__ = [
    "MemoryValues",
    "ProductKeyMemory",
    "param_groups",
    "clip_grad_norms",
    "value_parameters",
    "value_tables",
    "value_optimizer",
    "RowOptimizer",
    "SparseRowAdam",
    "SparseRowAdagrad",
    "FusedRowUpdate",
    "track_usage",
    "memory_usage",
    "usage_from_counts",
]

"""The layers users put in models: value pools, product-key memory, their recipe and statistics."""
from memory_ext.nn.cuda_host import cuda_host_values, cuda_host_view
from memory_ext.nn.file_values import load_pool_, load_values, read_values_header, save_values, write_values_file
from memory_ext.nn.fused import FusedRowUpdate
from memory_ext.nn.optim import clip_grad_norms, param_groups, value_optimizer, value_parameters, value_tables
from memory_ext.nn.product_key import ProductKeyMemory
from memory_ext.nn.quantized import QuantizedMemoryValues, dequantize_rows, quantize_rows, quantize_values
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
    "QuantizedMemoryValues",
    "quantize_rows",
    "dequantize_rows",
    "quantize_values",
    "save_values",
    "load_values",
    "load_pool_",
    "read_values_header",
    "write_values_file",
    "cuda_host_view",
    "cuda_host_values",
]

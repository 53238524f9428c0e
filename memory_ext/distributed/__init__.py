"""Column-sharded value tables on torch.distributed: the memory parallelism of Berges et al. 2024,
"Memory Layers at Scale".

A memory group of P ranks shares one (n_rows, dim) table: each rank holds all rows and
a contiguous slice of the columns (torch.chunk split, as DTensor Shard(1)). A lookup
takes each rank's own (indices, weights) and returns its own full-width rows; traffic
per call is the group's indices and weights plus one slice of each output row, instead
of whole output rows as with a row-sharded table.

Entry points: ShardedValues (the table: a MemoryValues, which builds one when given a
process group of several ranks), sharded_lookup (its forward), full_table / load_full_
(whole-table views), as_dtensor (its checkpoint form), dcp_state_dict /
load_dcp_state_dict (model and optimizer checkpoints that reshard), new_memory_groups /
exclude_from_ddp / sync_replica_grads / sharded_grad_norm (combining with data
parallelism and gradient clipping), count_comm (bytes moved).
"""
from memory_ext.distributed.checkpoint import dcp_state_dict, load_dcp_state_dict
from memory_ext.distributed.comm import CommStats, count_comm
from memory_ext.distributed.groups import (
    exclude_from_ddp,
    new_memory_groups,
    sharded_grad_norm,
    sharded_grad_square_norm,
    sharded_parameter_names,
    sync_replica_grads,
)
from memory_ext.distributed.layout import ColumnShard, column_split, is_sharded, shard_of
from memory_ext.distributed.lookup import sharded_lookup
from memory_ext.distributed.table import (
    as_dtensor,
    full_table,
    load_full_,
    local_columns,
    seeded_normal_columns_,
)
from memory_ext.distributed.values import ShardedValues

__all__ = [
    "ShardedValues",
    "sharded_lookup",
    "full_table",
    "load_full_",
    "local_columns",
    "as_dtensor",
    "seeded_normal_columns_",
    "column_split",
    "ColumnShard",
    "shard_of",
    "is_sharded",
    "new_memory_groups",
    "sharded_parameter_names",
    "exclude_from_ddp",
    "sync_replica_grads",
    "sharded_grad_square_norm",
    "sharded_grad_norm",
    "count_comm",
    "CommStats",
    "dcp_state_dict",
    "load_dcp_state_dict",
]


def __getattr__(name: str):
    # Removed in favour of ShardedValues, which owns its init instead of writing onto any module.
    if name == "init_sharded_values":
        raise AttributeError(
            "memory_ext.distributed.init_sharded_values was removed: build the table with "
            "ShardedValues(n_rows, dim, process_group=group, ...) or MemoryValues(..., process_group=group)"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Model and optimizer checkpoints of models with column-sharded tables, through
torch.distributed.checkpoint (DCP), that reshard between any memory-group sizes.

``get_state_dict`` returns a sharded table as a DTensor (its state_dict does) but the
optimizer state of that table (AdamW's moments) as each rank's plain (n_rows, size) column
slice, which DCP would save as one replicated tensor: rank 0's slice only. These two
functions wrap such state like the table, so it reshards like the table.
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.optim import Optimizer

from memory_ext.distributed.layout import is_sharded
from memory_ext.distributed.table import as_dtensor, local_columns

__all__ = ["dcp_state_dict", "load_dcp_state_dict"]


def _sharded_state(model: nn.Module, optim_state: dict):
    """(module, its per-parameter optimizer state) for each sharded table with state."""
    for name, module in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if is_sharded(module) and key in optim_state["state"]:
            yield module, key


def _is_slice(module: nn.Module, value) -> bool:
    return isinstance(value, Tensor) and tuple(value.shape) == tuple(module.weight.shape) and value.dim() == 2


def dcp_state_dict(model: nn.Module, optimizer: Optimizer) -> dict:
    """{"model": ..., "optim": ...} for ``dcp.save``: torch's get_state_dict, with every
    optimizer state tensor of a sharded table shaped like its slice (AdamW's exp_avg,
    exp_avg_sq) as a DTensor sharded like the table. The DTensors share the optimizer's
    storage, so ``dcp.load`` into this dict fills the state in place."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    for module, key in _sharded_state(model, optim_state):
        # A new dict: get_state_dict's per-parameter dicts may be the optimizer's own.
        state = optim_state["state"][key] = dict(optim_state["state"][key])
        for name, value in state.items():
            if _is_slice(module, value):
                state[name] = as_dtensor(module, value)
    return {"model": model_state, "optim": optim_state}


def load_dcp_state_dict(model: nn.Module, optimizer: Optimizer, state: dict) -> None:
    """Load what ``dcp.load`` read into a ``dcp_state_dict`` (of this or another split) back
    into model and optimizer (torch's set_state_dict, the table's state as local slices)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.tensor import DTensor

    for module, key in _sharded_state(model, state["optim"]):
        per_param = state["optim"]["state"][key]
        for name, value in per_param.items():
            if isinstance(value, DTensor):
                per_param[name] = local_columns(module, value)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

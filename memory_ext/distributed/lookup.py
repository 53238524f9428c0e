"""The column-sharded lookup: an autograd.Function over torch.distributed collectives.

Each rank holds all rows and a slice of the columns of the table (layout.py). A call
takes every rank's own (indices, weights) and returns every rank's own full-width rows:

forward   all-gather indices and weights in the group; the local embedding bag of the
          whole group's tokens over the local columns; an all-to-all returns each output
          column slice to the rank that owns the token; the slices are concatenated.
backward  the reverse all-to-all of the output gradient; the local sparse backward gives
          this rank's value gradient (every token of the group, local columns) and partial
          weight gradients (local columns only); an all-to-all brings the partials to the
          token's owner, which adds them in rank order (deterministic).

Before any of it, a small metadata tensor is all-gathered and checked on every rank, so
ranks that disagree (shapes, dtypes, table sizes, group, a skipped call) all raise the
same clear error instead of hanging in a mismatched collective.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from memory_ext._checks import InputError, accumulation_dtype, check_embedding_bag
from memory_ext.distributed.comm import all_gather_fixed, all_gather_rows, all_to_all_flat
from memory_ext.distributed.layout import ColumnShard, shard_of
from memory_ext.sparse_rows import sparse_rows_grad

__all__ = ["sharded_lookup"]

_MAGIC = 0x4D454D53  # marks a sharded-lookup metadata row, to catch crossed collectives
_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32]

# Metadata fields, one int64 each.
(
    _F_MAGIC, _F_ERROR, _F_TOKENS, _F_BAG, _F_INDEX_DTYPE, _F_VALUE_DTYPE, _F_N_ROWS, _F_DIM,
    _F_GROUP, _F_COL_START, _F_COL_SIZE, _F_NEEDS_GRAD, _F_WEIGHTS_GRAD, _F_CALL, _F_MIN, _F_MAX,
) = range(16)
_N_FIELDS = 16

@dataclass(frozen=True)
class _Plan:
    """What every rank agreed on for one lookup."""

    counts: tuple[int, ...]  # tokens per group rank
    bag: int
    need_backward: bool
    need_weights_grad: bool  # any rank's weights require grad


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def _local_error(weight: Tensor, indices: Tensor, weights: Tensor) -> tuple[int, tuple[bytes, torch.device]]:
    """This rank's check of its own inputs: (length in bytes of its error message, 0 when the
    inputs are valid; (the message in UTF-8, the device of the group's collectives)).

    The inputs get embedding_bag's own argument checks, with the weights in the dtype the
    local lookup sees (floating weights are converted to _compute_dtype first).
    """
    weights_dtype = _compute_dtype(weight) if weights.is_floating_point() else weights.dtype
    try:
        check_embedding_bag("sharded_lookup", weight, indices, weights, weights_dtype=weights_dtype)
    except InputError as err:
        message = err.what.encode()
        return len(message), (message, weight.device)
    return 0, (b"", weight.device)


def _exchange_metadata(shard: ColumnShard, weight: Tensor, indices: Tensor, weights: Tensor) -> _Plan:
    """All-gather one metadata row per rank and check them; raises the same error on every rank."""
    code, detail = _local_error(weight, indices, weights)
    ok = code == 0
    needs_grad = torch.is_grad_enabled() and (weight.requires_grad or weights.requires_grad)
    shard.calls += 1
    fields = [0] * _N_FIELDS
    fields[_F_MAGIC] = _MAGIC
    fields[_F_ERROR] = code
    fields[_F_TOKENS] = indices.shape[0] if ok else 0
    fields[_F_BAG] = indices.shape[1] if ok else 0
    fields[_F_INDEX_DTYPE] = _dtype_code(indices.dtype)
    fields[_F_VALUE_DTYPE] = _dtype_code(weight.dtype)
    fields[_F_N_ROWS] = weight.shape[0]
    fields[_F_DIM] = shard.dim
    fields[_F_GROUP] = zlib.crc32(repr(shard.ranks).encode())
    fields[_F_COL_START] = shard.start
    fields[_F_COL_SIZE] = weight.shape[1]
    fields[_F_NEEDS_GRAD] = int(needs_grad)
    fields[_F_WEIGHTS_GRAD] = int(ok and weights.requires_grad and torch.is_grad_enabled())
    fields[_F_CALL] = shard.calls
    meta = torch.tensor(fields, dtype=torch.int64, device=weight.device)
    if ok and indices.numel() > 0:
        # The index range is checked from the metadata, so an out-of-range index on one
        # rank stops every rank before the data collectives.
        lo, hi = torch.aminmax(indices.reshape(-1))
        meta[_F_MIN] = lo.to(torch.int64)
        meta[_F_MAX] = hi.to(torch.int64)
    rows = all_gather_fixed(meta, shard.group, shard.timeout, "metadata").tolist()
    _check(shard, rows, detail)
    return _Plan(
        counts=tuple(r[_F_TOKENS] for r in rows),
        bag=rows[0][_F_BAG],
        need_backward=bool(rows[0][_F_NEEDS_GRAD]),
        need_weights_grad=any(r[_F_WEIGHTS_GRAD] for r in rows),
    )


def _disagree(rows: list[list[int]], f: int, what: str, show=lambda v: v) -> None:
    values = [r[f] for r in rows]
    if any(v != values[0] for v in values):
        per_rank = ", ".join(f"rank {p}: {show(v)}" for p, v in enumerate(values))
        raise ValueError(f"memory.sharded_lookup: ranks of the memory group disagree on {what}, got {per_rank}")


def _check(shard: ColumnShard, rows: list[list[int]], mine: tuple[bytes, torch.device]) -> None:
    if any(r[_F_MAGIC] != _MAGIC for r in rows):
        raise ValueError(
            "memory.sharded_lookup: a rank of the group joined this lookup from another collective, got "
            + ", ".join(f"rank {p}: {r[_F_MAGIC]:#x}" for p, r in enumerate(rows))
        )
    lengths = [r[_F_ERROR] for r in rows]
    if any(lengths):
        # Some rank's inputs failed their checks; the metadata carried the length of each
        # rank's message, so one more gather (bounded by the shard's timeout) brings the
        # messages themselves and every rank raises the first failing rank's own words.
        message, device = mine
        local = torch.tensor(list(message), dtype=torch.uint8, device=device)
        gathered = bytes(all_gather_rows(local, lengths, shard.group, shard.timeout, "error_messages").tolist())
        p = next(p for p, n in enumerate(lengths) if n)
        start = sum(lengths[:p])
        what = gathered[start : start + lengths[p]].decode(errors="replace")
        raise ValueError(f"memory.sharded_lookup: group rank {p}: {what}")
    _disagree(rows, _F_GROUP, "the process group (group members differ)")
    _disagree(rows, _F_CALL, "the number of lookups so far (a rank skipped or added a call)")
    _disagree(rows, _F_N_ROWS, "the table's number of rows")
    _disagree(rows, _F_DIM, "the table's full width (dim)")
    show_dtype = lambda c: _DTYPES[c] if c < len(_DTYPES) else "other"  # noqa: E731
    _disagree(rows, _F_VALUE_DTYPE, "the table's dtype", show_dtype)
    for p, r in enumerate(rows):
        if (r[_F_COL_START], r[_F_COL_SIZE]) != shard.columns[p]:
            raise ValueError(
                f"memory.sharded_lookup: group rank {p} holds columns [{r[_F_COL_START]}, "
                f"{r[_F_COL_START] + r[_F_COL_SIZE]}) but the split of dim {shard.dim} gives it "
                f"{shard.columns[p]} (start, size), got a table built or loaded differently"
            )
    _disagree(rows, _F_BAG, "the bag size (indices.shape[1])")
    _disagree(rows, _F_INDEX_DTYPE, "the indices dtype", show_dtype)
    _disagree(
        rows, _F_NEEDS_GRAD,
        "whether the lookup needs a backward (grad mode, or requires_grad of table and weights)",
        bool,
    )
    for p, r in enumerate(rows):
        if r[_F_TOKENS] and (r[_F_MIN] < 0 or r[_F_MAX] >= shard.n_rows):
            raise ValueError(
                f"memory.sharded_lookup: index out of range on group rank {p}: indices span "
                f"[{r[_F_MIN]}, {r[_F_MAX]}] but the table has {shard.n_rows} rows"
            )


def _compute_dtype(weight: Tensor) -> torch.dtype:
    # Partial weight gradients are summed across ranks, so they travel in the accumulation
    # dtype (float32, float64 for float64 tables) and are rounded once at the end.
    return accumulation_dtype(weight.dtype)


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, weight: Tensor, indices: Tensor, weights: Tensor, shard: ColumnShard, plan: _Plan, sparse: bool
    ) -> Tensor:
        me, group, timeout = shard.group_rank, shard.group, shard.timeout
        counts, width = plan.counts, weight.shape[1]
        all_indices = all_gather_rows(indices, list(counts), group, timeout, "all_gather_indices")
        all_weights = all_gather_rows(
            weights.to(_compute_dtype(weight)), list(counts), group, timeout, "all_gather_weights"
        )
        # The index range was checked from the metadata (_exchange_metadata): no second check.
        local = torch.ops.memory.embedding_bag(weight, all_indices, all_weights, False)  # (sum(counts), width)
        # Rows of `local` are ordered by owner rank, so its flat memory is already the
        # concatenation of the blocks to send.
        recv_splits = [counts[me] * size for _, size in shard.columns]
        recv = all_to_all_flat(
            local.reshape(-1), [c * width for c in counts], recv_splits, group, timeout, "all_to_all_outputs"
        )
        pieces = [b.view(counts[me], size) for b, (_, size) in zip(recv.split(recv_splits), shard.columns, strict=True)]
        out = torch.cat(pieces, dim=1)
        if plan.need_backward:
            ctx.save_for_backward(weight, all_indices, all_weights)
            ctx.shard, ctx.plan, ctx.weights_dtype, ctx.sparse = shard, plan, weights.dtype, sparse
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        weight, all_indices, all_weights = ctx.saved_tensors
        shard, plan = ctx.shard, ctx.plan
        me, group, timeout = shard.group_rank, shard.group, shard.timeout
        counts, width, bag = plan.counts, weight.shape[1], plan.bag
        grad_out = grad_out.to(weight.dtype)
        send = torch.cat([grad_out[:, s : s + n].reshape(-1) for s, n in shard.columns])
        recv = all_to_all_flat(
            send, [counts[me] * n for _, n in shard.columns], [c * width for c in counts],
            group, timeout, "all_to_all_output_grads",
        )
        grad_local = recv.view(sum(counts), width)
        rows, rows_grad, partial = torch.ops.memory.embedding_bag_backward(
            grad_local, weight, all_indices, all_weights, plan.need_weights_grad
        )
        grad_weight = None
        if ctx.needs_input_grad[0]:
            if shard.grad_scale != 1.0:
                rows_grad = rows_grad * shard.grad_scale
            if ctx.sparse:  # the rows read by the whole group: the same on every rank
                grad_weight = sparse_rows_grad(rows, rows_grad, weight.shape)
            else:
                grad_weight = torch.ops.memory.rows_to_dense(rows, rows_grad, weight.shape[0], False)
        grad_weights = None
        if plan.need_weights_grad:
            # Every rank must take part, even one whose own weights need no gradient.
            recv = all_to_all_flat(
                partial.reshape(-1), [c * bag for c in counts], [counts[me] * bag] * len(counts),
                group, timeout, "all_to_all_weight_grads",
            )
            blocks = recv.view(len(counts), counts[me], bag)
            total = blocks[0].clone()
            for p in range(1, len(counts)):  # fixed rank order: bitwise reproducible
                total += blocks[p]
            if ctx.needs_input_grad[2]:
                grad_weights = total.to(ctx.weights_dtype)
        return grad_weight, None, grad_weights, None, None, None


@torch.compiler.disable
def sharded_lookup(module, indices: Tensor, weights: Tensor) -> Tensor:
    """This rank's rows of a lookup in a column-sharded table (the forward of ShardedValues).

    indices: (tokens, bag) int64/int32, weights: (tokens, bag) floating, this rank's own
    tokens (any count, zero included; the bag size, indices dtype and table must agree
    across the group) -> (tokens, dim) full-width rows in the table's dtype, equal to the
    unsharded table's lookup up to float32 summation order. Every rank of the group must
    call it, in the same order across its sharded tables, and (when it needs a backward)
    run backward through the output, even an empty one.

    Gradients: this rank's column slice of the table receives the gradient that one
    process would compute for the sum of all ranks' losses over the gathered batch
    (times 1 / group size with ``average_grads``): dense, or with the module's
    ``sparse_grad`` a sparse COO tensor of the rows the group read (unique, ascending,
    the same rows on every rank); weights receive exactly the gradient of this rank's
    own loss, as unsharded.
    """
    shard = shard_of(module)
    weight = module.weight
    plan = _exchange_metadata(shard, weight, indices, weights)
    return _ShardedLookup.apply(weight, indices, weights, shard, plan, bool(getattr(module, "sparse_grad", False)))

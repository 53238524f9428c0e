"""Column-sharded value table over torch.distributed (Gloo on CPU), world sizes 1 to 4.

The spawned jobs (one per world size, reused by all tests) check every case against a
plain-PyTorch float64 lookup of the gathered inputs; see dist_workers.py for the cases. The
checkpoint chain goes 1 (plain table, this process) -> 4 -> 2 -> 3 -> 1 (plain table); the
AdamW resume saves at 2 and loads at 2 and 3.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import memory_ext
from memory_ext import distributed as md
from memory_ext.testing import cuda_skip_reason

import dist_workers as W
from dist_harness import case_names, failures, run_job

WORLDS = (1, 4, 2, 3)  # the order of the checkpoint chain


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Results of one job per world size, and the checkpoint directories of the chain."""
    import torch.distributed.checkpoint as dcp

    tmp = tmp_path_factory.mktemp("ckpt")
    first = str(tmp / "from_1")
    plain = {}
    for key, table in W.ckpt_tables().items():
        module = memory_ext.MemoryValues(*table.shape, dtype=table.dtype)  # unsharded, no process group at all
        with torch.no_grad():
            module.weight.copy_(table)
        plain[key] = module.state_dict()
    with warnings.catch_warnings():  # DCP notes that it saves from a single process: intended
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(plain, checkpoint_id=first)
    results, previous = {}, first
    for world in WORLDS:
        load_from = save_to = None
        if world > 1:
            load_from, save_to = previous, str(tmp / f"from_{world}")
            previous = save_to
        results[world] = run_job(world, W.main_job, load_from, save_to, str(tmp / f"replica_{world}"))
    return results, previous


def _assert_cases(results, prefix, expected):
    bad = failures(results, prefix)
    assert not bad, "\n".join(bad)
    names = case_names(results, prefix)
    assert expected <= names, f"cases missing from the report: {sorted(expected - names)}"


LOOKUP_CASES = {
    "uneven_fp32", "even_fp64_int32", "narrow_table", "bf16", "all_empty",
    "shared_twice_average", "no_grad", "bytes_counted", "init_and_full_table",
    "sparse_uneven_fp32", "sparse_fp64", "sparse_bf16", "sparse_all_empty", "sparse_shared_twice_average",
}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_lookup_matches_single_process(jobs, world):
    _assert_cases(jobs[0][world], "lookup/", {f"lookup/{c}" for c in LOOKUP_CASES})


def test_memory_groups_with_ddp_and_replicas(jobs):
    expected = {f"groups/{c}" for c in LOOKUP_CASES} | {"groups/ddp_and_replicas", "groups/sparse_replicas"}
    _assert_cases(jobs[0][4], "groups/", expected)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_disagreeing_ranks_raise_everywhere(jobs, world):
    expected = {
        f"error/{c}" for c in (
            "bag", "weights_shape", "index_dtype", "dim", "table_dtype", "out_of_range",
            "needs_backward", "call_count", "group_still_usable", "load_slice_shape",
            "negative_index", "float_indices", "integer_weights", "layout_mismatch",
        )
    }
    _assert_cases(jobs[0][world], "error/", expected)


def test_timeout_when_a_rank_does_not_join(jobs):
    _assert_cases(jobs[0][2], "error/timeout", {"error/timeout"})


def test_timeout_when_a_rank_skips_the_backward(jobs):
    # The abandoned group is not reused; the world group still runs a lookup and backward.
    expected = {"error/timeout_skipped_backward", "error/timeout_world_still_usable"}
    _assert_cases(jobs[0][2], "error/timeout_", expected)


def test_clip_and_replica_sync_wait_at_most_the_table_timeout(jobs):
    # Neither is given a timeout: both must take the table's memory_shard.timeout.
    expected = {"error/timeout_clip_grad_norms", "error/timeout_sync_replica_grads"}
    _assert_cases(jobs[0][2], "error/timeout_", expected)


CLASS_CASES = {
    "memory_values_builds_it", "non_member_refused", "reset_is_split_invariant", "state_dict_round_trip",
    "deepcopy", "clip_grad_norms",
}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_values_class(jobs, world):
    _assert_cases(jobs[0][world], "class/", {f"class/{c}" for c in CLASS_CASES})


def test_checkpoint_reshards_4_2_3_1_exactly(jobs):
    import torch.distributed.checkpoint as dcp

    results, last = jobs
    for world in (4, 2, 3):
        _assert_cases(results[world], "ckpt/", {
            "ckpt/state_dict_is_dtensor", "ckpt/load_chain", "ckpt/save_chain", "ckpt/load_other_forms",
        })
    _assert_cases(results[4], "ckpt/replicated", {"ckpt/replicated_groups"})
    expect = W.ckpt_tables()
    modules = {k: memory_ext.MemoryValues(*t.shape, dtype=t.dtype) for k, t in expect.items()}
    sd = {k: m.state_dict() for k, m in modules.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=last)  # written by 3 ranks, read by one plain process
    for k, m in modules.items():
        m.load_state_dict(sd[k])
        assert torch.equal(m.weight, expect[k]), k


def test_adamw_resume_through_dcp_is_bitwise_the_uninterrupted_run(jobs):
    # Saved at world 2 after 3 steps; resumed at world 2 and, resharded, at world 3; AdamW on a
    # dense gradient and SparseRowAdam on a sparse one (which also trains as one process would).
    results = jobs[0]
    _assert_cases(results[2], "optim/", {
        "optim/state_of_sharded_table_is_local", "optim/resume_same_world", "optim/sparse_resume_same_world",
        "optim/sparse_equals_unsharded",
    })
    _assert_cases(results[3], "optim/", {
        "optim/resume_other_world", "optim/sparse_resume_other_world", "optim/sparse_equals_unsharded",
    })
    _assert_cases(results[4], "optim/", {"optim/sparse_equals_unsharded"})


@pytest.mark.skipif(cuda_skip_reason() is not None, reason=f"NCCL test: {cuda_skip_reason()}")
def test_world_1_on_nccl():
    # One GPU cannot host several NCCL ranks; world size 1 still runs every collective.
    results = run_job(1, W.nccl_job, backend="nccl")
    _assert_cases(results, "lookup/", {f"lookup/{c}" for c in LOOKUP_CASES})
    _assert_cases(results, "ckpt/", {"ckpt/state_dict_is_dtensor"})


# ---------------------------------------------------------------------------------------
# Single-process checks of the split rule and the initialisation.


@pytest.mark.parametrize("dim", [1, 2, 3, 5, 7, 10, 16, 33])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 5, 8])
def test_column_split_is_dtensors(dim, parts):
    from torch.distributed.tensor.placement_types import Shard

    split = md.column_split(dim, parts)
    assert sum(n for _, n in split) == dim
    assert [s for s, _ in split] == sorted(s for s, _ in split)
    for rank, (start, size) in enumerate(split):
        assert (size, start) == tuple(int(v) for v in Shard.local_shard_size_and_offset(dim, parts, rank))
    # torch.chunk drops trailing empty chunks; the split keeps them as (dim, 0).
    chunks = torch.arange(dim).chunk(parts)
    assert all(size == 0 for _, size in split[len(chunks) :])
    for (start, size), chunk in zip(split[: len(chunks)], chunks, strict=True):
        assert chunk.tolist() == list(range(start, start + size))


def test_column_split_rejects_nonpositive():
    with pytest.raises(ValueError, match="dim and parts must be positive, got 0 and 2"):
        md.column_split(0, 2)


def test_seeded_init_does_not_depend_on_the_split():
    full = md.seeded_normal_columns_(torch.empty(50, 12), 0, 99, 0.5)
    assert abs(full.std().item() - 0.5) < 0.1
    for parts in (2, 3, 5):
        pieces = [md.seeded_normal_columns_(torch.empty(50, n), s, 99, 0.5) for s, n in md.column_split(12, parts)]
        assert torch.equal(torch.cat(pieces, dim=1), full)
    assert not torch.equal(full[:, 0], full[:, 1])


def test_sharded_table_needs_a_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="ShardedValues: torch.distributed is not initialised"):
        md.ShardedValues(4, 4)


@pytest.mark.parametrize("n_rows, dim", [(0, 4), (4, 0), (-1, 4)])
def test_sharded_table_rejects_nonpositive_sizes(n_rows, dim):
    with pytest.raises(ValueError, match=f"ShardedValues: n_rows and dim must be positive, got {n_rows} and {dim}"):
        md.ShardedValues(n_rows, dim)


def test_init_sharded_values_was_removed():
    with pytest.raises(AttributeError, match="init_sharded_values was removed: build the table with ShardedValues"):
        md.init_sharded_values  # noqa: B018


def test_shard_of_rejects_plain_modules():
    with pytest.raises(ValueError, match="is not a column-sharded table"):
        md.sharded_lookup(nn.Linear(2, 2), torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1))


# ---------------------------------------------------------------------------------------
# Memory parallelism in a model built from the layers (MemoryValues, ProductKeyMemory).

HAS_LAYERS = hasattr(memory_ext, "MemoryValues") and hasattr(memory_ext, "ProductKeyMemory")


@pytest.mark.skipif(
    not HAS_LAYERS, reason="memory_ext.MemoryValues / ProductKeyMemory not in this build (layers branch)"
)
def test_memory_model_with_memory_parallel_2_matches_unsharded(jobs):
    # Run inside the world-2 job (dist_model_job.model_job) to save a process launch.
    _assert_cases(jobs[0][2], "model/", {"model/loss_matches", "model/values_match"})

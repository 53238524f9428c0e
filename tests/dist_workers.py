"""Job bodies of the multi-process tests (run by dist_harness on every rank).

Every rank builds the same full table and every rank's inputs from one seed, so each
can compute the single-process reference itself and compare its own share of the
sharded results with it, without extra communication.
"""
from __future__ import annotations

import re
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import memory_ext
from memory_ext import distributed as md
from dist_harness import case

CASE_TIMEOUT = timedelta(seconds=60)  # generous: the test machine may be busy


class Values(nn.Module):
    """Minimal value table following MemoryValues' agreed interface (sharded when given a group)."""

    def __init__(self, n_rows, dim, *, dtype=None, device=None, process_group=None, **options):
        super().__init__()
        self.n_rows, self.dim, self.process_group = n_rows, dim, process_group
        if process_group is not None:
            options.setdefault("timeout", CASE_TIMEOUT)
            md.init_sharded_values(
                self, n_rows, dim, dtype=dtype, device=device, process_group=process_group, **options
            )
        else:
            self.weight = nn.Parameter(torch.randn(n_rows, dim, dtype=dtype, device=device) * dim**-0.5)

    def forward(self, indices, weights):
        if self.process_group is not None:
            return md.sharded_lookup(self, indices, weights)
        return memory_ext.embedding_bag(self.weight, indices, weights)


def make_table(seed, n_rows, dim, dtype):
    """The full table every process of a case agrees on."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, dim, generator=g, dtype=torch.float64).to(dtype)


def make_inputs(seed, n_rows, dim, bag, counts, index_dtype, weights_dtype=torch.float32):
    """Per rank: indices (c, bag), weights (c, bag), output-gradient (c, dim) float32."""
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for c in counts:
        idx = torch.randint(0, n_rows, (c, bag), generator=g).to(index_dtype)
        w = torch.rand(c, bag, generator=g).to(weights_dtype)
        gout = torch.randn(c, dim, generator=g)
        out.append((idx, w, gout))
    return out


def reference(table, inputs, weights_grad, grad_scale=1.0):
    """Single-process lookup of the gathered batch (memory_ext op) and a float64 plain-PyTorch check."""
    w_ref = table.clone().requires_grad_(True)
    outs, weight_leaves, loss = [], [], 0.0
    for call in inputs:
        idx = torch.cat([i for i, _, _ in call])
        w = torch.cat([x for _, x, _ in call]).detach().requires_grad_(weights_grad)
        gout = torch.cat([g for _, _, g in call])
        out = memory_ext.embedding_bag(w_ref, idx, w)
        plain = (table.double()[idx.long()] * w.detach().double().unsqueeze(-1)).sum(1)
        tol = {"rtol": 2e-2, "atol": 2e-2} if table.dtype in (torch.bfloat16, torch.float16) else {}
        assert_close(out.double(), plain, **tol)
        loss = loss + (out.float() * gout).sum()
        outs.append(out.detach())
        weight_leaves.append(w)
    loss.backward()
    grad_table = w_ref.grad * grad_scale if grad_scale != 1.0 else w_ref.grad
    return outs, grad_table, [w.grad for w in weight_leaves]


def lookup_case(rank, group, spec, results, name, device="cpu"):
    """Sharded lookup on ``group`` (tables on ``device``) vs the single-process reference on the CPU."""
    with case(results, name):
        n_rows, dim, bag, counts = spec["n_rows"], spec["dim"], spec["bag"], spec["counts"]
        dtype = spec.get("dtype", torch.float32)
        calls = spec.get("calls", 1)
        grad_ranks = spec.get("weights_grad_ranks", range(len(counts)))
        average = spec.get("average_grads", False)
        me = dist.get_rank(group)
        seed = spec["seed"]
        table = make_table(seed, n_rows, dim, dtype)
        inputs = [
            make_inputs(seed + 10 * c, n_rows, dim, bag, counts, spec.get("index_dtype", torch.int64))
            for c in range(calls)
        ]

        def run():
            module = Values(n_rows, dim, dtype=dtype, device=device, process_group=group, average_grads=average)
            md.load_full_(module, table.to(device))
            loss, outs, leaves = 0.0, [], []
            for call in inputs:
                idx, w, gout = (t.to(device) for t in call[me])
                w = w.clone().requires_grad_(me in grad_ranks)
                out = module(idx, w)
                assert out.shape == (counts[me], dim) and out.dtype == dtype
                loss = loss + (out.float() * gout).sum()
                outs.append(out.detach().cpu())
                leaves.append(w)
            loss.backward()
            return module, outs, [None if w.grad is None else w.grad.cpu() for w in leaves]

        module, outs, w_grads = run()
        ref_outs, ref_table_grad, ref_w_grads = reference(
            table, inputs, True, 1.0 / group.size() if average else 1.0
        )
        lo = sum(counts[:me])
        start, size = md.shard_of(module).start, md.shard_of(module).size
        for c in range(calls):
            assert_close(outs[c], ref_outs[c][lo : lo + counts[me]])
            if me in grad_ranks:
                assert_close(w_grads[c], ref_w_grads[c][lo : lo + counts[me]])
            else:
                assert w_grads[c] is None
        assert_close(module.weight.grad.cpu(), ref_table_grad[:, start : start + size])
        if spec.get("check_determinism"):
            again, outs2, w_grads2 = run()
            assert all(torch.equal(a, b) for a, b in zip(outs, outs2))
            assert torch.equal(module.weight.grad, again.weight.grad)
            assert all(torch.equal(a, b) for a, b in zip(w_grads, w_grads2) if a is not None)


def lookup_cases(rank, world, results, group, tag, device="cpu"):
    """All lookup cases on ``group`` (size P), tables on ``device``; counts are per group rank."""
    P = group.size()
    pick = lambda xs: [xs[i % len(xs)] for i in range(P)]  # noqa: E731
    specs = {
        "uneven_fp32": dict(n_rows=37, dim=10, bag=5, counts=pick([5, 0, 9, 2]), check_determinism=True),
        "even_fp64_int32": dict(n_rows=64, dim=12, bag=7, counts=[6] * P, dtype=torch.float64, index_dtype=torch.int32),
        "narrow_table": dict(n_rows=11, dim=3, bag=3, counts=pick([4, 1, 0, 3])),
        "bf16": dict(n_rows=50, dim=10, bag=4, counts=pick([3, 4, 5, 6]), dtype=torch.bfloat16),
        "all_empty": dict(n_rows=9, dim=10, bag=4, counts=[0] * P),
        "shared_twice_average": dict(
            n_rows=23, dim=7, bag=6, counts=pick([4, 3, 2, 1]), calls=2, average_grads=True, weights_grad_ranks=[0]
        ),
    }
    for i, (name, spec) in enumerate(specs.items()):
        spec["seed"] = 100 * i + 7
        lookup_case(rank, group, spec, results, f"{tag}/{name}", device)

    with case(results, f"{tag}/no_grad"):
        table = make_table(3, 20, 10, torch.float32)
        counts = pick([2, 5, 0, 1])
        inputs = make_inputs(3, 20, 10, 4, counts, torch.int64)
        me = dist.get_rank(group)
        module = md.load_full_(Values(20, 10, device=device, process_group=group), table.to(device))
        with torch.no_grad():
            out = module(inputs[me][0].to(device), inputs[me][1].to(device)).cpu()
        ref = memory_ext.embedding_bag(table, *[torch.cat(t) for t in list(zip(*inputs))[:2]])
        lo = sum(counts[:me])
        assert not out.requires_grad
        assert_close(out, ref[lo : lo + counts[me]])

    with case(results, f"{tag}/bytes_counted"):
        n_rows, dim, bag = 30, 10, 4
        counts = pick([3, 1, 4, 2])
        me = dist.get_rank(group)
        module = Values(n_rows, dim, device=device, process_group=group)
        idx, w, gout = (t.to(device) for t in make_inputs(5, n_rows, dim, bag, counts, torch.int64)[me])
        with md.count_comm() as stats:
            out = module(idx, w.requires_grad_(True))
            (out * gout).sum().backward()
        size, tokens, most = md.shard_of(module).size, sum(counts), max(counts)
        expect_sent = {
            "metadata": 16 * 8 * (P - 1),
            "all_gather_indices": most * bag * 8 * (P - 1),
            "all_gather_weights": most * bag * 4 * (P - 1),
            "all_to_all_outputs": (tokens - counts[me]) * size * 4,
            "all_to_all_output_grads": counts[me] * (dim - size) * 4,
            "all_to_all_weight_grads": (tokens - counts[me]) * bag * 4,
        }
        assert stats.sent == expect_sent, (stats.sent, expect_sent)
        assert stats.received["all_to_all_outputs"] == counts[me] * (dim - size) * 4

    with case(results, f"{tag}/init_and_full_table"):
        n_rows, dim = 13, 11
        module = Values(n_rows, dim, device=device, process_group=group, seed=1234)
        expect = md.seeded_normal_columns_(torch.empty(n_rows, dim, device=device), 0, 1234, dim**-0.5)
        assert torch.equal(md.full_table(module), expect)
        at_last = md.full_table(module, group_dst=P - 1)
        if dist.get_rank(group) == P - 1:
            assert torch.equal(at_last, expect)
        else:
            assert at_last is None


def error_cases(rank, world, results):
    """Ranks that disagree raise the same clear error everywhere; the group stays usable."""
    group = dist.group.WORLD
    last = world - 1

    def expect_error(name, pattern, build, call):
        with case(results, f"error/{name}"):
            module = build()
            try:
                call(module)
            except ValueError as err:
                assert re.search(pattern, str(err)), str(err)
            else:
                raise AssertionError(f"no error raised, expected {pattern!r}")

    def std(dim=10, dtype=torch.float32):
        return lambda: Values(20, dim, dtype=dtype, process_group=group)

    def inputs(bag=4, index_dtype=torch.int64, tokens=3, high=20):
        return torch.randint(0, high, (tokens, bag)).to(index_dtype), torch.rand(tokens, bag)

    expect_error("bag", r"disagree on the bag size.*rank 0: 4.*rank 1: 5",
                 std(), lambda m: m(*inputs(bag=4 if rank == 0 else 5)))
    expect_error("weights_shape", rf"group rank {last}: weights must have the shape of indices",
                 std(), lambda m: m(inputs()[0], torch.rand(3, 4 if rank != last else 6)))
    expect_error("index_dtype", r"disagree on the indices dtype",
                 std(), lambda m: m(*inputs(index_dtype=torch.int32 if rank == 1 else torch.int64)))
    expect_error("dim", r"disagree on the table's full width",
                 std(dim=10 if rank == 0 else 12), lambda m: m(*inputs()))
    expect_error("table_dtype", r"disagree on the table's dtype",
                 std(dtype=torch.float64 if rank == 0 else torch.float32), lambda m: m(*inputs()))
    def out_of_range(m):
        if rank == last:
            m(torch.full((2, 4), 20), torch.rand(2, 4))
        else:
            m(*inputs())

    expect_error("out_of_range", rf"index out of range on group rank {last}: indices span \[\d+, 20\]",
                 std(), out_of_range)

    def grad_mode_differs(m):
        with torch.set_grad_enabled(rank != 0):
            m(*inputs())

    expect_error("needs_backward", r"disagree on whether the lookup needs a backward", std(), grad_mode_differs)

    def skipped_call(m):
        if rank == 0:  # rank 0 makes one extra call: its counter runs ahead
            m.memory_shard.calls += 1
        m(*inputs())

    expect_error("call_count", r"disagree on the number of lookups", std(), skipped_call)

    with case(results, "error/group_still_usable"):
        module = Values(20, 10, process_group=group)
        module(*inputs())[0].sum().backward()
        assert module.weight.grad is not None

    with case(results, "error/load_slice_shape"):
        module = Values(20, 10, process_group=group)
        try:
            module.load_state_dict({"weight": torch.zeros(20, md.shard_of(module).size)})
        except ValueError as err:
            assert "loads the whole table (20, 10)" in str(err), str(err)
        else:
            raise AssertionError("loading a slice-shaped plain tensor did not raise")


def timeout_case(rank, world, results):
    """A rank that never joins makes the others raise within the configured timeout."""
    spare = dist.new_group(list(range(world)))  # poisoned by the abandoned call, never reused
    with case(results, "error/timeout"):
        module = Values(20, 10, process_group=spare, timeout=timedelta(seconds=1.5))
        if rank == 0:
            t0 = time.monotonic()
            try:
                module(torch.zeros(2, 3, dtype=torch.int64), torch.rand(2, 3))
            except RuntimeError as err:
                assert "did not complete within" in str(err), str(err)
                assert time.monotonic() - t0 < 10, "timeout took too long"
            else:
                raise AssertionError("lookup without the other ranks did not time out")
    dist.barrier()  # the world group is unaffected


def _ckpt_modules(group):
    """Two tables of the checkpoint chain: fp32 with an uneven split, bf16 narrower."""
    return {"a": Values(37, 10, process_group=group), "b": Values(29, 7, dtype=torch.bfloat16, process_group=group)}


CKPT_TABLES = {"a": (37, 10, torch.float32, 11), "b": (29, 7, torch.bfloat16, 12)}


def ckpt_tables():
    """The tables every stage of the checkpoint chain must reproduce bit for bit."""
    return {k: make_table(seed, n, d, dt) for k, (n, d, dt, seed) in CKPT_TABLES.items()}


def checkpoint_cases(rank, world, results, load_from, save_to):
    """Load the chain's checkpoint written by another world size, check every bit, save it again."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    group = dist.group.WORLD
    expect = ckpt_tables()
    with case(results, "ckpt/state_dict_is_dtensor"):
        module = Values(37, 10, process_group=group)
        sd = module.state_dict()
        w = sd["weight"]
        assert isinstance(w, DTensor) and tuple(w.placements) == (Shard(1),), w
        assert w.shape == (37, 10)
        assert w.to_local().data_ptr() == module.weight.data_ptr()
        assert torch.equal(w.full_tensor(), md.full_table(module))

    with case(results, "ckpt/load_chain"):
        modules = _ckpt_modules(group)
        sd = {k: m.state_dict() for k, m in modules.items()}
        dcp.load(sd, checkpoint_id=load_from)
        for k, m in modules.items():
            m.load_state_dict(sd[k])
            assert torch.equal(md.full_table(m), expect[k]), k

    with case(results, "ckpt/save_chain"):
        dcp.save({k: m.state_dict() for k, m in modules.items()}, checkpoint_id=save_to)

    with case(results, "ckpt/load_other_forms"):
        full = expect["a"]
        mesh = md.shard_of(modules["a"]).device_mesh("cpu")
        for form in (full, distribute_tensor(full, mesh, [Replicate()]), distribute_tensor(full, mesh, [Shard(0)])):
            m = Values(37, 10, process_group=group)
            m.load_state_dict({"weight": form})
            assert torch.equal(md.full_table(m), full)


def replica_checkpoint_case(rank, world, results, tmp):
    """Two memory groups each hold the table: DCP keeps one copy and loads into one group of 4."""
    import torch.distributed.checkpoint as dcp

    memory, _ = md.new_memory_groups(2)
    with case(results, "ckpt/replicated_groups"):
        table = ckpt_tables()["a"]
        m = md.load_full_(Values(37, 10, process_group=memory), table)
        dcp.save({"a": m.state_dict()}, checkpoint_id=tmp)
        m4 = Values(37, 10, process_group=dist.group.WORLD)
        sd = {"a": m4.state_dict()}
        dcp.load(sd, checkpoint_id=tmp)
        assert torch.equal(md.full_table(m4), table)


def data_parallel_case(rank, world, results):
    """Memory groups of 2 inside a world of 4: DDP for the rest, replica sync for the table."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    memory, replica = md.new_memory_groups(2)
    lookup_cases(rank, world, results, memory, "groups")
    with case(results, "groups/ddp_and_replicas"):
        n_rows, dim, bag, feat = 31, 9, 5, 6
        counts = [3, 0, 5, 2]
        g = torch.Generator().manual_seed(77)
        xs = [torch.randn(c, feat, generator=g) for c in counts]
        idx = [torch.randint(0, n_rows, (c, bag), generator=g) for c in counts]
        gouts = [torch.randn(c, dim, generator=g) for c in counts]
        table = make_table(78, n_rows, dim, torch.float32)

        class Tiny(nn.Module):
            def __init__(self, values):
                super().__init__()
                torch.manual_seed(79)
                self.proj = nn.Linear(feat, bag)
                self.values = values

            def forward(self, x, i):
                return self.values(i, torch.softmax(self.proj(x), -1))

        model = Tiny(md.load_full_(Values(n_rows, dim, process_group=memory, average_grads=True), table))
        assert md.exclude_from_ddp(model) == ["values.weight"]
        ddp = DDP(model)
        (ddp(xs[rank], idx[rank]) * gouts[rank]).sum().backward()
        md.sync_replica_grads(model, replica)

        ref = Tiny(Values(n_rows, dim))
        with torch.no_grad():
            ref.values.weight.copy_(table)
        loss = sum((ref(x, i) * go).sum() for x, i, go in zip(xs, idx, gouts)) / world
        loss.backward()
        shard = md.shard_of(model.values)
        assert_close(model.values.weight.grad, ref.values.weight.grad[:, shard.start : shard.start + shard.size])
        assert_close(model.proj.weight.grad, ref.proj.weight.grad)
        norm = md.sharded_grad_norm(model)
        assert_close(norm, ref.values.weight.grad.norm())
        assert_close(model.proj.bias.grad, ref.proj.bias.grad)


def main_job(rank, world, results, load_from, save_to, tmp):
    """Everything one world size checks, in one process group."""
    lookup_cases(rank, world, results, dist.group.WORLD, "lookup")
    if world == 4:
        data_parallel_case(rank, world, results)
        replica_checkpoint_case(rank, world, results, tmp)
    if world > 1:
        error_cases(rank, world, results)
    if load_from:
        checkpoint_cases(rank, world, results, load_from, save_to)
    if world == 2 and hasattr(memory_ext, "ProductKeyMemory"):
        import dist_model_job

        dist_model_job.model_job(rank, world, results)
    if world == 2:
        timeout_case(rank, world, results)  # last: it leaves a spare group unusable


def nccl_job(rank, world, results):
    """The lookup cases with CUDA tables over NCCL (world size 1 on a single GPU)."""
    lookup_cases(rank, world, results, dist.group.WORLD, "lookup", device="cuda")
    with case(results, "ckpt/state_dict_is_dtensor"):
        from torch.distributed.tensor import DTensor

        module = Values(37, 10, device="cuda", process_group=dist.group.WORLD)
        w = module.state_dict()["weight"]
        assert isinstance(w, DTensor) and w.device.type == "cuda"
        assert torch.equal(w.full_tensor(), md.full_table(module))

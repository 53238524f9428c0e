"""Job bodies of the multi-process tests (run by dist_harness on every rank).

Every rank builds the same full table and every rank's inputs from one seed, so each
can compute the reference itself and compare its own share of the sharded results with
it, without extra communication. References are plain PyTorch in float64
(memory_ext.reference), compared with tolerance(dtype, terms=...); comparisons between
runs of the same kernels (repeated runs, other splits, checkpoints) are bitwise.
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
from memory_ext.reference import embedding_bag_backward_ref, embedding_bag_ref
from memory_ext.sparse_rows import coalesced
from memory_ext.testing import tolerance

from dist_harness import case

CASE_TIMEOUT = timedelta(seconds=60)  # generous: the test machine may be busy


def sharded(n_rows, dim, group, **options):
    """The real ShardedValues on ``group``, with the cases' generous timeout unless given."""
    options.setdefault("timeout", CASE_TIMEOUT)
    return md.ShardedValues(n_rows, dim, process_group=group, **options)


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


def reference(table, inputs, grad_scale=1.0):
    """Plain-PyTorch float64 lookup of the gathered batch of every call, and the gradients of
    sum(out * gout) over all calls: (outputs per call, table gradient, weight gradients per call)."""
    outs, grad_table, grad_weights = [], torch.zeros(table.shape, dtype=torch.float64), []
    for call in inputs:
        idx, w, gout = (torch.cat(t) for t in zip(*call, strict=True))
        outs.append(embedding_bag_ref(table, idx, w, rounded=False))
        # The kernels round the output gradient to the table's dtype first, as the reference does.
        g_table, g_w = embedding_bag_backward_ref(gout, table, idx, w)
        grad_table += g_table
        grad_weights.append(g_w)
    return outs, grad_table * grad_scale, grad_weights


def close_to_reference(actual, expected, dtype, terms, **options):
    """actual (any dtype) within tolerance(dtype, terms) of the float64 reference."""
    assert_close(actual.double(), expected, check_dtype=False, **tolerance(dtype, terms=terms, **options))


class PlainValues(nn.Module):
    """The unsharded value table in plain PyTorch (the references' lookup, differentiable)."""

    def __init__(self, table):
        super().__init__()
        self.weight = nn.Parameter(table.clone())

    def forward(self, indices, weights):
        return (self.weight[indices.long()] * weights.unsqueeze(-1)).sum(1)


def lookup_case(rank, group, spec, results, name, device="cpu"):
    """Sharded lookup on ``group`` (tables on ``device``) vs the float64 plain-PyTorch reference on the CPU."""
    with case(results, name):
        n_rows, dim, bag, counts = spec["n_rows"], spec["dim"], spec["bag"], spec["counts"]
        dtype = spec.get("dtype", torch.float32)
        calls = spec.get("calls", 1)
        grad_ranks = spec.get("weights_grad_ranks", range(len(counts)))
        average = spec.get("average_grads", False)
        sparse = spec.get("sparse", False)
        me = dist.get_rank(group)
        seed = spec["seed"]
        table = make_table(seed, n_rows, dim, dtype)
        inputs = [
            make_inputs(seed + 10 * c, n_rows, dim, bag, counts, spec.get("index_dtype", torch.int64))
            for c in range(calls)
        ]

        def run():
            module = sharded(n_rows, dim, group, dtype=dtype, device=device, average_grads=average, sparse_grad=sparse)
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
        ref_outs, ref_table_grad, ref_w_grads = reference(table, inputs, 1.0 / group.size() if average else 1.0)
        lo = sum(counts[:me])
        start, size = md.shard_of(module).start, md.shard_of(module).size
        # Against the float64 reference: an output sums `bag` products, a weight gradient
        # `dim`, a table row's gradient at most every (token, slot) of every call; the
        # table gradient is rounded to its dtype per call and once more when scaled or
        # accumulated over calls.
        for c in range(calls):
            close_to_reference(outs[c], ref_outs[c][lo : lo + counts[me]], dtype, bag)
            if me in grad_ranks:
                close_to_reference(w_grads[c], ref_w_grads[c][lo : lo + counts[me]], torch.float32, dim)
            else:
                assert w_grads[c] is None
        grad = module.weight.grad
        if sparse:
            grad = sparse_slice_grad(grad, inputs)
            if calls == 1 and not average:
                # The same kernel over the same gathered tokens, column by column: bitwise.
                assert torch.equal(grad, unsharded_sparse_grad(table, inputs)[:, start : start + size].to(device))
        close_to_reference(
            grad.cpu(), ref_table_grad[:, start : start + size], dtype, calls * sum(counts) * bag,
            rounded_twice=average or calls > 1,
        )
        # Determinism (bitwise): the same kernels on the same split, run again.
        if spec.get("check_determinism"):
            again, outs2, w_grads2 = run()
            assert all(torch.equal(a, b) for a, b in zip(outs, outs2, strict=True))
            assert torch.equal(module.weight.grad.to_dense(), again.weight.grad.to_dense())
            assert all(torch.equal(a, b) for a, b in zip(w_grads, w_grads2, strict=True) if a is not None)


def gathered_rows(inputs):
    """The rows read by the whole group in every call: unique, ascending."""
    return torch.unique(torch.cat([idx.long().flatten() for call in inputs for idx, _, _ in call]))


def sparse_slice_grad(grad, inputs):
    """A sharded table's sparse gradient, checked to hold exactly the rows the group read, as dense."""
    assert grad.is_sparse, "sparse_grad=True must give a sparse gradient"
    grad = coalesced(grad)
    assert torch.equal(grad.indices()[0].cpu(), gathered_rows(inputs)), "rows: the group's rows, once, ascending"
    return grad.to_dense()


def unsharded_sparse_grad(table, inputs):
    """The gradient of one unsharded MemoryValues(sparse_grad=True) on the gathered batch, as dense."""
    whole = memory_ext.MemoryValues(*table.shape, dtype=table.dtype, sparse_grad=True)
    with torch.no_grad():
        whole.weight.copy_(table)
    for call in inputs:
        idx, w, gout = (torch.cat(t) for t in zip(*call, strict=True))
        (whole(idx, w).float() * gout).sum().backward()
    return whole.weight.grad.to_dense()


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
        "sparse_uneven_fp32": dict(
            n_rows=37, dim=10, bag=5, counts=pick([5, 0, 9, 2]), sparse=True, check_determinism=True
        ),
        "sparse_fp64": dict(n_rows=64, dim=12, bag=7, counts=[6] * P, dtype=torch.float64, sparse=True),
        "sparse_bf16": dict(n_rows=50, dim=10, bag=4, counts=pick([3, 4, 5, 6]), dtype=torch.bfloat16, sparse=True),
        "sparse_all_empty": dict(n_rows=9, dim=10, bag=4, counts=[0] * P, sparse=True),
        "sparse_shared_twice_average": dict(
            n_rows=23, dim=7, bag=6, counts=pick([4, 3, 2, 1]), calls=2, average_grads=True, sparse=True
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
        module = md.load_full_(sharded(20, 10, group, device=device), table.to(device))
        with torch.no_grad():
            out = module(inputs[me][0].to(device), inputs[me][1].to(device)).cpu()
        ref = embedding_bag_ref(table, *[torch.cat(t) for t in list(zip(*inputs, strict=True))[:2]], rounded=False)
        lo = sum(counts[:me])
        assert not out.requires_grad
        close_to_reference(out, ref[lo : lo + counts[me]], torch.float32, 4)

    with case(results, f"{tag}/bytes_counted"):
        n_rows, dim, bag = 30, 10, 4
        counts = pick([3, 1, 4, 2])
        me = dist.get_rank(group)
        module = sharded(n_rows, dim, group, device=device)
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
        module = sharded(n_rows, dim, group, device=device, seed=1234)
        expect = md.seeded_normal_columns_(torch.empty(n_rows, dim, device=device), 0, 1234, dim**-0.5)
        assert torch.equal(md.full_table(module), expect)
        at_last = md.full_table(module, group_dst=P - 1)
        if dist.get_rank(group) == P - 1:
            assert torch.equal(at_last, expect)
        else:
            assert at_last is None


def class_cases(rank, world, results):
    """ShardedValues as a class: what MemoryValues builds, reset, state_dict, deepcopy, clipping."""
    group = dist.group.WORLD
    # Every rank alone in a group of one: a ShardedValues there holds the whole table, the
    # one-rank reference for the split-invariance checks.
    solo, _ = dist.new_subgroups(1)
    me = dist.get_rank(group)

    with case(results, "class/memory_values_builds_it"):
        values = memory_ext.MemoryValues(13, 11, process_group=group)
        assert isinstance(values, memory_ext.MemoryValues)
        if world > 1:
            assert type(values) is md.ShardedValues and values.sharded and md.is_sharded(values)
            assert values.weight.shape == (13, md.shard_of(values).size)
            assert values.process_group is group
        else:  # a group of one rank stays a plain table
            assert type(values) is memory_ext.MemoryValues and not values.sharded
            assert values.weight.shape == (13, 11)
        assert memory_ext.nn.value_parameters(nn.Sequential(values)) == [values.weight]
        one_rank = sharded(13, 11, solo)
        assert type(one_rank) is md.ShardedValues and isinstance(one_rank, memory_ext.MemoryValues)

    first_only = dist.new_group([0])  # a collective: every rank creates it
    with case(results, "class/non_member_refused"):
        if rank != 0:
            try:
                sharded(4, 4, first_only)
            except ValueError as err:
                assert f"this rank ({rank}) is not a member of process_group, got members [0]" in str(err), str(err)
            else:
                raise AssertionError("a table on a group without this rank was built")

    with case(results, "class/reset_is_split_invariant"):
        torch.manual_seed(5)
        table = sharded(13, 11, group)
        torch.manual_seed(5)
        whole = sharded(13, 11, solo)
        assert torch.equal(md.full_table(table), whole.weight)
        before = whole.weight.detach().clone()
        torch.manual_seed(6)
        table.reset_parameters()
        torch.manual_seed(6)
        whole.reset_parameters()
        assert torch.equal(md.full_table(table), whole.weight)
        assert not torch.equal(whole.weight, before)
        table.reset_parameters(seed=1234)
        assert torch.equal(md.full_table(table), md.seeded_normal_columns_(torch.empty(13, 11), 0, 1234, 11**-0.5))

    with case(results, "class/state_dict_round_trip"):
        from torch.distributed.tensor import DTensor

        source = sharded(37, 10, group, seed=1)
        with torch.no_grad():
            source.weight.add_(torch.arange(source.weight.shape[1], dtype=torch.float32))  # off the init
        full = md.full_table(source)
        sd = source.state_dict()
        assert isinstance(sd["weight"], DTensor)
        target = sharded(37, 10, group, seed=2)
        target.load_state_dict(sd)
        assert torch.equal(md.full_table(target), full)
        plain = memory_ext.MemoryValues(37, 10)
        plain.load_state_dict({"weight": sd["weight"].full_tensor()})
        assert torch.equal(plain.weight, full)
        back = sharded(37, 10, group, seed=3)
        back.load_state_dict(plain.state_dict())
        assert torch.equal(md.full_table(back), full)
        whole = sharded(37, 10, solo, seed=4)  # another split: all columns on one rank
        whole.load_state_dict(sd)
        assert torch.equal(whole.weight, full)

    with case(results, "class/deepcopy"):
        import copy

        table = sharded(20, 10, group, seed=7)
        twin = copy.deepcopy(table)
        assert type(twin) is md.ShardedValues and twin.process_group is table.process_group
        assert twin.weight is not table.weight and torch.equal(twin.weight, table.weight)
        twin.memory_shard.average_grads = True
        assert not table.memory_shard.average_grads
        idx, w = torch.randint(0, 20, (3, 4), generator=torch.Generator().manual_seed(me)), torch.rand(3, 4)
        assert torch.equal(twin(idx, w), table(idx, w))

    with case(results, "class/clip_grad_norms"):
        P = group.size()
        n_rows, dim, bag = 29, 9, 4
        counts = [[3, 5, 2, 4][p % 4] for p in range(P)]
        table = make_table(51, n_rows, dim, torch.float32)
        inputs = make_inputs(51, n_rows, dim, bag, counts, torch.int64)
        torch.manual_seed(52)  # the plain parts alike on every rank
        model = nn.ModuleDict({
            "shared": md.load_full_(sharded(n_rows, dim, group), table),
            "plain": memory_ext.MemoryValues(n_rows, dim),
            "proj": nn.Linear(3, 2),
        })
        idx, w, gout = inputs[me]
        loss = (model["shared"](idx, w) * gout).sum() + (model["plain"](idx, w) * gout).sum()
        (loss + model["proj"](torch.full((1, 3), float(me + 1))).sum()).backward()
        _, ref_shared, _ = reference(table, [inputs])  # the group's summed loss, float64
        ref_shared = ref_shared.float()
        plain = model["plain"].weight.grad.clone()
        others = torch.cat([p.grad.flatten() for p in model["proj"].parameters()])
        expect = (ref_shared.norm() ** 2 + plain.norm() ** 2).sqrt()
        other_norm, values_norm = memory_ext.clip_grad_norms(model, 1e3, values_max_norm=0.5 * expect.item())
        assert_close(values_norm, expect)
        assert_close(other_norm, others.norm())
        coef = 0.5 * expect / (expect + 1e-6)
        shard = md.shard_of(model["shared"])
        assert_close(model["shared"].weight.grad, ref_shared[:, shard.start : shard.start + shard.size] * coef)
        assert_close(model["plain"].weight.grad, plain * coef)
        assert_close(model["proj"].weight.grad.flatten(), others[:6])  # under its max_norm: unchanged


def error_cases(rank, world, results):
    """Ranks that disagree or pass bad input raise the same clear error everywhere; the group stays usable."""
    group = dist.group.WORLD
    last = world - 1

    def expect_error(name, pattern, build, call):
        with case(results, f"error/{name}"):
            module, message = build(), None
            try:
                call(module)
            except ValueError as err:
                message = str(err)
            # Every rank takes part in the comparison, whatever it got, so a rank that
            # raised nothing fails its case instead of hanging the others.
            messages = [None] * world
            dist.all_gather_object(messages, message, group=group)
            assert message is not None, f"no error raised, expected {pattern!r}"
            assert re.search(pattern, message), message
            assert all(m == message for m in messages), f"ranks raised different errors: {messages}"
            _still_usable(group)

    def std(dim=10, dtype=torch.float32):
        return lambda: sharded(20, dim, group, dtype=dtype)

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

    def negative_index(m):
        idx, w = inputs()
        if rank == last:
            idx[1, 2] = -1
        m(idx, w)

    expect_error("negative_index", rf"index out of range on group rank {last}: indices span \[-1, \d+\] "
                 r"but the table has 20 rows", std(), negative_index)
    expect_error("float_indices", rf"^memory.sharded_lookup: group rank {last}: indices must be int64 or int32, "
                 r"got Float$", std(),
                 lambda m: m(*inputs(index_dtype=torch.float32 if rank == last else torch.int64)))

    def integer_weights(m):
        idx, w = inputs()
        m(idx, (w * 10).long() if rank == 0 else w)

    expect_error("integer_weights", r"^memory.sharded_lookup: group rank 0: weights must be float32 or the "
                 r"values' dtype \(Float\), got Long$", std(), integer_weights)

    def other_columns():
        # The last rank's table was built for another split (one column more than the
        # split gives it), as a slice loaded by hand from another world size would be.
        m = sharded(20, 10, group)
        if rank == last:
            m.weight = nn.Parameter(torch.randn(20, m.memory_shard.size + 1))
        return m

    start, size = md.column_split(10, world)[last]
    expect_error("layout_mismatch", rf"^memory.sharded_lookup: group rank {last} holds columns \[{start}, "
                 rf"{start + size + 1}\) but the split of dim 10 gives it \({start}, {size}\) \(start, size\), "
                 r"got a table built or loaded differently$", other_columns, lambda m: m(*inputs()))

    with case(results, "error/group_still_usable"):
        module = sharded(20, 10, group)
        module(*inputs())[0].sum().backward()
        assert module.weight.grad is not None

    with case(results, "error/load_slice_shape"):
        module = sharded(20, 10, group)
        try:
            module.load_state_dict({"weight": torch.zeros(20, md.shard_of(module).size)})
        except ValueError as err:
            assert "loads the whole table (20, 10)" in str(err), str(err)
        else:
            raise AssertionError("loading a slice-shaped plain tensor did not raise")


def _still_usable(group):
    """A lookup and backward on ``group`` right after an error: every rank gets the plain-PyTorch answer."""
    me, P = dist.get_rank(group), group.size()
    counts = [2 + p % 3 for p in range(P)]
    table = make_table(91, 20, 10, torch.float32)
    inputs = make_inputs(91, 20, 10, 4, counts, torch.int64)
    module = md.load_full_(sharded(20, 10, group), table)
    idx, w, gout = inputs[me]
    w = w.clone().requires_grad_(True)
    out = module(idx, w)
    (out * gout).sum().backward()
    all_idx, all_w, all_gout = (torch.cat(t) for t in zip(*inputs, strict=True))
    ref_out = embedding_bag_ref(table, all_idx, all_w, rounded=False)
    ref_table, ref_w = embedding_bag_backward_ref(all_gout, table, all_idx, all_w)
    lo, shard = sum(counts[:me]), md.shard_of(module)
    assert_close(out.double(), ref_out[lo : lo + counts[me]], **tolerance(torch.float32, terms=4), check_dtype=False)
    assert_close(w.grad.double(), ref_w[lo : lo + counts[me]], **tolerance(torch.float32, terms=10), check_dtype=False)
    assert_close(module.weight.grad.double(), ref_table[:, shard.start : shard.start + shard.size],
                 **tolerance(torch.float32, terms=4 * sum(counts)), check_dtype=False)


def _expect_timeout(call, what):
    """call() on a group whose other rank never joins: a clear error within the table's timeout."""
    t0 = time.monotonic()
    try:
        call()
    except RuntimeError as err:
        assert f"{what} did not complete within" in str(err), str(err)
        assert time.monotonic() - t0 < 10, "timeout took too long"
    else:
        raise AssertionError(f"{what} without the other ranks did not time out")


def timeout_cases(rank, world, results):
    """A rank that never joins makes the others raise within the table's timeout."""
    short = timedelta(seconds=1.5)
    # One spare group per case: each is poisoned by its abandoned call and never reused.
    spares = [dist.new_group(list(range(world))) for _ in range(4)]
    solo, _ = dist.new_subgroups(1)
    with case(results, "error/timeout"):
        module = sharded(20, 10, spares[0], timeout=short)
        if rank == 0:
            _expect_timeout(lambda: module(torch.zeros(2, 3, dtype=torch.int64), torch.rand(2, 3)), "metadata")

    with case(results, "error/timeout_clip_grad_norms"):
        module = sharded(20, 10, spares[1], timeout=short)
        module.weight.grad = torch.ones_like(module.weight)
        if rank == 0:
            _expect_timeout(lambda: memory_ext.clip_grad_norms(module), "sharded_grad_norm")

    with case(results, "error/timeout_sync_replica_grads"):
        module = sharded(20, 10, solo, timeout=short)  # replicated on every rank of spares[2]
        module.weight.grad = torch.ones_like(module.weight)
        if rank == 0:
            _expect_timeout(lambda: md.sync_replica_grads(module, spares[2]), "sync_replica_grads")
    with case(results, "error/timeout_skipped_backward"):
        # Rank 0 runs the forward and drops the output; the others' backward waits for
        # it in the output-gradient all-to-all and must give up within the timeout. The
        # group is left with an abandoned collective: it is not reused (not promised).
        module = sharded(20, 10, spares[3])  # the ranks arrive apart: a long wait for the forward
        out = module(torch.randint(0, 20, (2, 3)), torch.rand(2, 3))
        module.memory_shard.timeout = short  # read at backward time
        if rank != 0:
            _expect_timeout(lambda: out.sum().backward(), "all_to_all_output_grads")
    dist.barrier()  # the world group is unaffected
    with case(results, "error/timeout_world_still_usable"):
        _still_usable(dist.group.WORLD)


def _ckpt_modules(group):
    """Two tables of the checkpoint chain: fp32 with an uneven split, bf16 narrower."""
    return {"a": sharded(37, 10, group), "b": sharded(29, 7, group, dtype=torch.bfloat16)}


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
        module = sharded(37, 10, group)
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
            m = sharded(37, 10, group)
            m.load_state_dict({"weight": form})
            assert torch.equal(md.full_table(m), full)


OPT_ROWS, OPT_DIM, OPT_BAG, OPT_TOKENS, OPT_SAVED_AT, OPT_STEPS = 23, 7, 3, 10, 3, 5


class OptimModel(nn.Module):
    """A sharded table trained alone: fixed weights, so its update does not depend on the split."""

    def __init__(self, group, seed, sparse=False):
        super().__init__()
        self.table = sharded(OPT_ROWS, OPT_DIM, group, seed=seed, sparse_grad=sparse)

    def forward(self, indices, weights):
        return self.table(indices, weights)


def _optim_setup(group, seed=31, sparse=False):
    """The table and its optimizer: AdamW on a dense gradient, or SparseRowAdam on a sparse one."""
    model = OptimModel(group, seed, sparse)
    if sparse:
        return model, memory_ext.nn.SparseRowAdam(model.parameters(), lr=0.05, weight_decay=0.1)
    return model, torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)


def _optim_steps(model, opt, group, steps):
    """Train steps [first, last): the global batch of each step split over the group's ranks in order."""
    me = dist.get_rank(group)
    counts = [n for _, n in md.column_split(OPT_TOKENS, group.size())]
    lo = sum(counts[:me])
    for step in range(*steps):
        g = torch.Generator().manual_seed(1000 + step)
        idx = torch.randint(0, OPT_ROWS, (OPT_TOKENS, OPT_BAG), generator=g)[lo : lo + counts[me]]
        w = torch.rand(OPT_TOKENS, OPT_BAG, generator=g)[lo : lo + counts[me]]
        gout = torch.randn(OPT_TOKENS, OPT_DIM, generator=g)[lo : lo + counts[me]]
        opt.zero_grad()
        (model(idx, w) * gout).sum().backward()
        opt.step()


_MOMENTS = ("exp_avg", "exp_avg_sq")


def _optim_snapshot(model, opt):
    """Full table and full moments (assembled over the group) and the step count."""
    table = model.table
    state = opt.state[table.weight]
    full = [md.full_table(table)] + [md.as_dtensor(table, state[k]).full_tensor() for k in _MOMENTS]
    return full, float(state["step"])


def _assert_same_training(a, b):
    (tensors_a, step_a), (tensors_b, step_b) = a, b
    assert step_a == step_b, (step_a, step_b)
    for name, x, y in zip(("table", *_MOMENTS), tensors_a, tensors_b, strict=True):
        assert torch.equal(x, y), f"{name} differs after resuming: max |diff| {(x - y).abs().max().item()}"


def optim_checkpoint_cases(rank, world, results, load_from, save_to):
    """AdamW on a sharded table through DCP: resumed training is bitwise the uninterrupted run.

    World 2 saves after OPT_SAVED_AT steps and resumes in fresh objects; world 3 resumes
    from world 2's checkpoint (the table and moments resharded 2 -> 3). Bitwise, since the
    table's gradient and AdamW's update act column by column, whatever the split.
    """
    import torch.distributed.checkpoint as dcp

    group = dist.group.WORLD
    if world == 2:
        with case(results, "optim/state_of_sharded_table_is_local"):
            model, opt = _optim_setup(group)
            _optim_steps(model, opt, group, (0, 1))
            from torch.distributed.checkpoint.state_dict import get_state_dict

            _, osd = get_state_dict(model, opt)
            moment = osd["state"]["table.weight"]["exp_avg"]
            # Why md.dcp_state_dict wraps the moments: left as they are, they are slices.
            assert type(moment) is torch.Tensor and moment.shape == (OPT_ROWS, md.shard_of(model.table).size)
    for sparse, tag in ((False, ""), (True, "sparse_")):
        ckpt = f"{save_to}_{tag}optim" if world == 2 else f"{load_from}_{tag}optim"
        if world == 2:
            with case(results, f"optim/{tag}resume_same_world"):
                model, opt = _optim_setup(group, sparse=sparse)
                _optim_steps(model, opt, group, (0, OPT_SAVED_AT))
                dcp.save(md.dcp_state_dict(model, opt), checkpoint_id=ckpt)
                _optim_steps(model, opt, group, (OPT_SAVED_AT, OPT_STEPS))
                uninterrupted = _optim_snapshot(model, opt)

                model, opt = _optim_setup(group, seed=32, sparse=sparse)  # fresh: another init, no state yet
                sd = md.dcp_state_dict(model, opt)
                dcp.load(sd, checkpoint_id=ckpt)
                md.load_dcp_state_dict(model, opt, sd)
                _optim_steps(model, opt, group, (OPT_SAVED_AT, OPT_STEPS))
                _assert_same_training(_optim_snapshot(model, opt), uninterrupted)
        if world == 3:
            with case(results, f"optim/{tag}resume_other_world"):
                model, opt = _optim_setup(group, sparse=sparse)
                _optim_steps(model, opt, group, (0, OPT_STEPS))
                uninterrupted = _optim_snapshot(model, opt)

                model, opt = _optim_setup(group, seed=32, sparse=sparse)
                sd = md.dcp_state_dict(model, opt)
                dcp.load(sd, checkpoint_id=ckpt)  # written by 2 ranks
                md.load_dcp_state_dict(model, opt, sd)
                _optim_steps(model, opt, group, (OPT_SAVED_AT, OPT_STEPS))
                _assert_same_training(_optim_snapshot(model, opt), uninterrupted)
    with case(results, "optim/sparse_equals_unsharded"):
        # SparseRowAdam on the sharded sparse table: bitwise one process's sparse training.
        model, opt = _optim_setup(group, sparse=True)
        _optim_steps(model, opt, group, (0, OPT_STEPS))
        whole = _unsharded_sparse_training(seed=31)
        assert torch.equal(md.full_table(model.table), whole)


def _unsharded_sparse_training(seed):
    """The table of _optim_steps trained by one process: MemoryValues(sparse_grad=True) + SparseRowAdam."""
    table = memory_ext.MemoryValues(OPT_ROWS, OPT_DIM, sparse_grad=True)
    md.seeded_normal_columns_(table.weight.data, 0, seed, OPT_DIM**-0.5)  # what ShardedValues(seed=seed) holds
    opt = memory_ext.nn.SparseRowAdam(table.parameters(), lr=0.05, weight_decay=0.1)
    for step in range(OPT_STEPS):
        g = torch.Generator().manual_seed(1000 + step)
        idx = torch.randint(0, OPT_ROWS, (OPT_TOKENS, OPT_BAG), generator=g)
        w = torch.rand(OPT_TOKENS, OPT_BAG, generator=g)
        gout = torch.randn(OPT_TOKENS, OPT_DIM, generator=g)
        opt.zero_grad()
        (table(idx, w) * gout).sum().backward()
        opt.step()
    return table.weight.detach()


def replica_checkpoint_case(rank, world, results, tmp):
    """Two memory groups each hold the table: DCP keeps one copy and loads into one group of 4."""
    import torch.distributed.checkpoint as dcp

    memory, _ = md.new_memory_groups(2)
    with case(results, "ckpt/replicated_groups"):
        table = ckpt_tables()["a"]
        m = md.load_full_(sharded(37, 10, memory), table)
        dcp.save({"a": m.state_dict()}, checkpoint_id=tmp)
        m4 = sharded(37, 10, dist.group.WORLD)
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

        model = Tiny(md.load_full_(sharded(n_rows, dim, memory, average_grads=True), table))
        assert md.exclude_from_ddp(model) == ["values.weight"]
        ddp = DDP(model)
        (ddp(xs[rank], idx[rank]) * gouts[rank]).sum().backward()
        md.sync_replica_grads(model, replica)

        ref = Tiny(PlainValues(table)).double()  # plain PyTorch, float64
        loss = sum((ref(x.double(), i) * go.double()).sum() for x, i, go in zip(xs, idx, gouts, strict=True)) / world
        loss.backward()
        shard = md.shard_of(model.values)
        tokens = sum(counts)
        ref_values = ref.values.weight.grad
        close_to_reference(model.values.weight.grad, ref_values[:, shard.start : shard.start + shard.size],
                           torch.float32, tokens * bag, rounded_twice=True)
        # proj's gradient goes through the weights' gradient (dim terms) and the softmax.
        close_to_reference(model.proj.weight.grad, ref.proj.weight.grad, torch.float32, tokens * dim * bag)
        close_to_reference(model.proj.bias.grad, ref.proj.bias.grad, torch.float32, tokens * dim * bag)
        norm = md.sharded_grad_norm(model)
        close_to_reference(norm, ref_values.norm(), torch.float32, ref_values.numel() + tokens * bag)

    with case(results, "groups/sparse_replicas"):
        # Sparse slice gradients averaged over the replica group: the union of the rows the
        # two memory groups read, the mean of all four ranks' gradients, the same bits on
        # both replicas, and the same norm as the dense path.
        n_rows, dim, bag = 41, 9, 3
        counts = [4, 2, 0, 5]
        inputs = make_inputs(91, n_rows, dim, bag, counts, torch.int64)
        table = make_table(92, n_rows, dim, torch.float32)
        grads, norms = {}, {}
        for sparse in (False, True):
            m = md.load_full_(sharded(n_rows, dim, memory, average_grads=True, sparse_grad=sparse), table)
            idx, w, gout = inputs[rank]
            (m(idx, w) * gout).sum().backward()
            md.sync_replica_grads(m, replica)
            grads[sparse], norms[sparse] = m.weight.grad, md.sharded_grad_norm(m)
        g = grads[True]
        assert g.is_sparse
        assert torch.equal(g.indices()[0], gathered_rows([inputs])), "the union of the replicas' rows"
        shard = md.shard_of(m)
        _, ref_grad, _ = reference(table, [inputs], 1.0 / world)
        close_to_reference(g.to_dense(), ref_grad[:, shard.start : shard.start + shard.size], torch.float32,
                           sum(counts) * bag, rounded_twice=True)
        close_to_reference(g.to_dense(), grads[False].double(), torch.float32, sum(counts) * bag, rounded_twice=True)
        close_to_reference(norms[True], norms[False].double(), torch.float32, sum(counts) * bag)
        both = [torch.empty_like(g.to_dense()) for _ in range(dist.get_world_size(replica))]
        dist.all_gather(both, g.to_dense(), group=replica)
        assert all(torch.equal(both[0], x) for x in both), "replicas must hold the same bits"


def main_job(rank, world, results, load_from, save_to, tmp):
    """Everything one world size checks, in one process group."""
    lookup_cases(rank, world, results, dist.group.WORLD, "lookup")
    class_cases(rank, world, results)
    if world == 4:
        data_parallel_case(rank, world, results)
        replica_checkpoint_case(rank, world, results, tmp)
    if world > 1:
        error_cases(rank, world, results)
    if load_from:
        checkpoint_cases(rank, world, results, load_from, save_to)
        optim_checkpoint_cases(rank, world, results, load_from, save_to)
    if world == 2 and hasattr(memory_ext, "ProductKeyMemory"):
        import dist_model_job

        dist_model_job.model_job(rank, world, results)
    if world == 2:
        timeout_cases(rank, world, results)  # last: they leave spare groups unusable


def nccl_job(rank, world, results):
    """The lookup cases with CUDA tables over NCCL (world size 1 on a single GPU)."""
    lookup_cases(rank, world, results, dist.group.WORLD, "lookup", device="cuda")
    with case(results, "ckpt/state_dict_is_dtensor"):
        from torch.distributed.tensor import DTensor

        module = sharded(37, 10, dist.group.WORLD, device="cuda")
        w = module.state_dict()["weight"]
        assert isinstance(w, DTensor) and w.device.type == "cuda"
        assert torch.equal(w.full_tensor(), md.full_table(module))

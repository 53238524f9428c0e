"""Time and bytes per step of the column-sharded lookup against a row-sharded table.

Both schemes serve the same job: every rank of a group of P holds its own (tokens, bag)
indices and weights and needs its own (tokens, dim) outputs, forward and backward.

column  (memory_ext.distributed, the paper's scheme) all rows, dim / P columns per rank:
        all-gather indices + weights, all-to-all of output column slices, and back.
row     (the alternative, as a row-wise sharded embedding) n_rows / P rows per rank, all
        columns: all-gather indices + weights, each rank sums the rows it holds into
        partial full-width outputs for every token of the group, reduce-scatter of the
        partials to the token owners; backward all-gathers the output gradients and
        reduce-scatters the partial weight gradients.

Run: python bench/bench_sharded.py --world 2 (Gloo on the CPU). Prints a table and
writes JSON (machine, versions, commit, arguments, per-scheme medians and bytes).
python bench/bench_sharded.py --estimate prints the communication estimate for the
paper's configuration instead (no processes started).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import memory_ext  # noqa: E402
from memory_ext import distributed as md  # noqa: E402
from memory_ext.distributed import comm  # noqa: E402
from memory_ext.provenance import recorded_options  # noqa: E402

_ops = torch.ops.memory


# ---------------------------------------------------------------------------------------
# Bytes each rank sends per step (forward + backward), equal token counts T per rank.


def bytes_model(P: int, T: int, dim: int, bag: int, value_bytes: int, index_bytes: int = 8) -> dict:
    """Predicted bytes sent per rank per step, by phase, for both schemes (metadata ignored)."""
    gather = (P - 1) * T * bag * (index_bytes + 4)  # indices + float32 weights
    weight_grads = (P - 1) * T * bag * 4
    column = {
        "all_gather indices+weights": gather,
        "all_to_all outputs": (P - 1) * T * dim * value_bytes / P,
        "all_to_all output grads": (P - 1) * T * dim * value_bytes / P,
        "all_to_all weight grads": weight_grads,
    }
    row = {
        "all_gather indices+weights": gather,
        "reduce_scatter outputs": (P - 1) * T * dim * value_bytes,
        "all_gather output grads": (P - 1) * T * dim * value_bytes,
        "reduce_scatter weight grads": weight_grads,
    }
    return {"column": column, "row": row}


def print_estimate() -> None:
    """The paper's configuration: 64 GPUs, memory groups of 8, 1M x 4096 bf16 values, 8k tokens, bag 128."""
    P, T, dim, bag, rows = 8, 8192, 4096, 128, 1 << 20
    model = bytes_model(P, T, dim, bag, value_bytes=2)
    print(f"per GPU, per memory-layer call (forward + backward): P={P}, T={T}, dim={dim}, bag={bag}, bf16 values")
    for scheme, phases in model.items():
        total = sum(phases.values())
        print(f"  {scheme}: {total / 1e6:.1f} MB")
        for name, b in phases.items():
            print(f"    {name:28s} {b / 1e6:8.1f} MB")
    ratio = sum(model["row"].values()) / sum(model["column"].values())
    print(f"  row / column = {ratio:.2f}")
    slice_bytes = rows * dim // P * 2
    replicas = 64 // P
    print(
        f"value-gradient all-reduce over the {replicas} replicas of a slice ({slice_bytes / 2**30:.2f} GiB bf16): "
        f"{2 * (replicas - 1) / replicas * slice_bytes / 1e9:.2f} GB sent per GPU per step (either scheme)"
    )


# ---------------------------------------------------------------------------------------
# The row-sharded alternative (benchmark only).


def _row_split(n_rows: int, P: int, rank: int) -> tuple[int, int]:
    start, size = md.column_split(n_rows, P)[rank]
    return start, size


class _RowSharded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, indices, weights, group, row_start, T):
        P = group.size()
        counts = [T] * P
        all_idx = comm.all_gather_rows(indices, counts, group, name="all_gather_indices")
        all_w = comm.all_gather_rows(weights.float(), counts, group, name="all_gather_weights")
        local = all_idx - row_start
        mine = (local >= 0) & (local < weight.shape[0])
        local = torch.where(mine, local, torch.zeros_like(local))
        masked_w = torch.where(mine, all_w, torch.zeros_like(all_w))
        partial = _ops.embedding_bag(weight, local, masked_w)  # (P * T, dim)
        out = partial.new_empty((T, partial.shape[1]))
        work = dist.reduce_scatter_tensor(out, partial, group=group, async_op=True)
        work.wait()
        n = partial.numel() * partial.element_size()
        comm._record("reduce_scatter_outputs", n * (P - 1) // P, n * (P - 1) // P)
        ctx.save_for_backward(weight, local, masked_w, mine)
        ctx.group, ctx.T = group, T
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, local, masked_w, mine = ctx.saved_tensors
        group, T = ctx.group, ctx.T
        P = group.size()
        grad_all = comm.all_gather_rows(grad_out.contiguous(), [T] * P, group, name="all_gather_output_grads")
        rows, rows_grad, wg = _ops.embedding_bag_backward(grad_all, weight, local, masked_w, True)
        grad_weight = _ops.rows_to_dense(rows, rows_grad, weight.shape[0])
        wg = torch.where(mine, wg, torch.zeros_like(wg))  # weights of rows held elsewhere
        out = wg.new_empty((T, wg.shape[1]))
        work = dist.reduce_scatter_tensor(out, wg.contiguous(), group=group, async_op=True)
        work.wait()
        n = wg.numel() * wg.element_size()
        comm._record("reduce_scatter_weight_grads", n * (P - 1) // P, n * (P - 1) // P)
        return grad_weight, None, out, None, None, None


# ---------------------------------------------------------------------------------------
# The job on each rank.


def _worker(rank, world, store, args, out_path):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    group = dist.group.WORLD
    dtype = getattr(torch, args.dtype)
    T, bag, dim, n_rows = args.tokens, args.bag, args.dim, args.rows
    g = torch.Generator().manual_seed(1234)
    full = torch.randn(n_rows, dim, generator=g).to(dtype) * dim**-0.5
    inputs = []
    for _ in range(world):
        idx = torch.randint(0, n_rows, (T, bag), generator=g)
        w = torch.softmax(torch.randn(T, bag, generator=g), -1)
        inputs.append((idx, w, torch.randn(T, dim, generator=g).to(dtype)))
    idx, w, gout = inputs[rank]

    col = md.load_full_(md.ShardedValues(n_rows, dim, dtype=dtype, process_group=group), full)
    r0, rs = _row_split(n_rows, world, rank)
    row_weight = nn.Parameter(full[r0 : r0 + rs].clone())

    def col_step():
        wl = w.clone().requires_grad_(True)
        out = col(idx, wl)
        out.backward(gout)
        return out, wl.grad

    def row_step():
        wl = w.clone().requires_grad_(True)
        out = _RowSharded.apply(row_weight, idx, wl, group, r0, T)
        out.backward(gout)
        return out, wl.grad

    # Both schemes must compute the same thing before their times mean anything.
    (oc, gc), (orow, grow) = col_step(), row_step()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(oc, orow, **tol)
    torch.testing.assert_close(gc, grow, **tol)

    results = {}
    for name, step in (("column", col_step), ("row", row_step)):
        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.steps):
            col.weight.grad = row_weight.grad = None
            dist.barrier()
            t0 = time.perf_counter()
            with comm.count_comm() as stats:
                step()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        results[name] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "sent_bytes_per_step": stats.total_sent,
            "sent_by_collective": dict(stats.sent),
        }
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def _machine() -> dict:
    def git(*cmd):
        try:
            return subprocess.check_output(["git", *cmd], cwd=ROOT, text=True, stderr=subprocess.DEVNULL).strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "memory_ext": memory_ext.__version__,
        "backend": "gloo",
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain")),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--rows", type=int, default=1 << 16)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    p.add_argument("--bag", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "bench_sharded.json"))
    p.add_argument("--estimate", action="store_true", help="print the paper-configuration estimate and exit")
    args = p.parse_args()
    if args.estimate:
        print_estimate()
        return

    with tempfile.TemporaryDirectory(prefix="bench_sharded_") as tmp:
        path = os.path.join(tmp, "rank0.json")
        mp.start_processes(_worker, args=(args.world, os.path.join(tmp, "store"), args, path),
                           nprocs=args.world, start_method="spawn")
        results = json.load(open(path))

    value_bytes = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    model = bytes_model(args.world, args.tokens, args.dim, args.bag, value_bytes)
    report = {"machine": _machine(), "args": recorded_options(args), "results": results,
              "bytes_model_per_rank": {k: sum(v.values()) for k, v in model.items()}}
    print(f"P={args.world} rows={args.rows} dim={args.dim} tokens/rank={args.tokens} bag={args.bag} {args.dtype}, "
          f"Gloo, {args.threads} thread(s)/rank, load {report['machine']['load_average_at_start'][0]:.1f}")
    print(f"{'scheme':8s} {'median ms':>10s} {'min ms':>8s} {'MB sent/rank':>13s} {'model MB':>9s}")
    for name, r in results.items():
        print(f"{name:8s} {r['median_s'] * 1e3:10.2f} {r['min_s'] * 1e3:8.2f} "
              f"{r['sent_bytes_per_step'] / 1e6:13.2f} {report['bytes_model_per_rank'][name] / 1e6:9.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""One training step of a value table: lookup, backward, optimizer step.

The step a memory layer's table takes every iteration, timed end to end: the weighted
bag forward, its backward, and the optimizer update. memory_ext's dense path (the full
table gradient and AdamW over every row) against its sparse path (MemoryValues with
sparse_grad=True: a gradient of the rows read, and SparseRowAdam, lazy AdamW over those
rows only in one fused pass), and torch's F.embedding_bag with AdamW or SparseAdam. Reported as tokens/s and as the
bytes the step must move at least (rows read twice, their gradient and Adam state read
and written once) per second, next to the copy bandwidth measured in the same run
(pct_copy) and, step by step, against a copy timed just before each of as many more steps
(pct_paired: the median of those steps' shares; paired_copy_gbs: the median copy), which
follows the machine's bandwidth where it drifts within a run.

    python bench/bench_value_update.py [--device cpu|cuda] [--quick] [--rows 1048576] [--dim 256]
        [--out bench/out/value_update.json]

Each step is timed --iters times after a warm-up: ms is the median, min_ms and max_ms the
extremes. Inputs are drawn on the device; the JSON file is rewritten after every
implementation.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    CopyProbe,
    copy_bandwidth_gbs,
    machine_info,
    paired_pct_copy,
    print_table,
    recorded_options,
    save_json,
    spread_ms,
    time_samples_ms,
)

from memory_ext import MemoryValues  # noqa: E402
from memory_ext.nn import SparseRowAdam  # noqa: E402
from memory_ext.testing import generator, sample_inputs  # noqa: E402


def step_fn(lookup, table: torch.Tensor, optimizer: torch.optim.Optimizer, indices, weights, grad_out):
    def step():
        optimizer.zero_grad(set_to_none=True)
        lookup(table, indices, weights).backward(grad_out)
        optimizer.step()

    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=1 << 20)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--bag", type=int, default=64, help="heads * k rows per token")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke run of a few seconds")
    p.add_argument("--out", default="bench/out/value_update.json")
    args = p.parse_args()
    if args.quick:
        args.rows, args.dim, args.tokens, args.bag, args.iters = 8192, 64, 256, 16, 3
    dev = args.device
    # Only the lookups of the sample are used (dim=1: a one-column table); each implementation
    # builds its own table below.
    s = sample_inputs("embedding_bag", dev, tokens=args.tokens, bag=args.bag, rows=args.rows, dim=1, seed=0)
    indices, grad_out = s["indices"], torch.randn(args.tokens, args.dim, generator=generator(dev, 1), device=dev)
    weights = torch.softmax(s["weights"], -1)
    g = generator(dev, 2)
    touched = int(indices.unique().numel())

    info = machine_info(dev)
    copy = copy_bandwidth_gbs(dev, nbytes=(1 << 26) if args.quick else (1 << 30))
    print(f"device {dev} ({info.get('gpu', info['cpu'])}), threads {info['threads']}, copy bandwidth {copy:.1f} GB/s; "
          f"table {args.rows} x {args.dim} fp32, {args.tokens} tokens x {args.bag} rows, {touched} rows touched")
    # Least bytes a step must move: the rows read in the forward and again in the backward,
    # and for each touched row its gradient, parameter and two Adam moments read and written.
    elem = 4
    least_bytes = 2 * args.tokens * args.bag * args.dim * elem + touched * args.dim * elem * 7

    def ours(sparse: bool):
        values = MemoryValues(args.rows, args.dim, device=dev, sparse_grad=sparse)
        return values, lambda table, i, w: values(i, w)

    def torch_bag(sparse: bool):
        table = torch.nn.Parameter(torch.randn(args.rows, args.dim, generator=g, device=dev) * args.dim**-0.5)
        return table, lambda t, i, w: F.embedding_bag(i, t, mode="sum", per_sample_weights=w, sparse=sparse)

    rows = []
    probe = CopyProbe(dev, nbytes=(1 << 24) if args.quick else (1 << 28))
    payload = dict(benchmark="value_update", machine=info, copy_gbs=copy, config=recorded_options(args), touched_rows=touched,
                   complete=False, results=rows)
    for impl, make in (("memory_ext", ours), ("torch", torch_bag)):
        for sparse in (True, False):
            owner, lookup = make(sparse)
            table = owner.weight if isinstance(owner, MemoryValues) else owner
            if sparse and impl == "memory_ext":
                opt = SparseRowAdam([table], lr=1e-3, betas=(0.9, 0.95))
            elif sparse:
                opt = torch.optim.SparseAdam([table], lr=1e-3, betas=(0.9, 0.95))
            else:
                opt = torch.optim.AdamW([table], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
            step = step_fn(lookup, table, opt, indices, weights, grad_out)
            spread = spread_ms(time_samples_ms(step, dev, warmup=2, iters=args.iters))
            # as many steps again, each after a copy timed just before it (their times not kept:
            # the copy evicts the caches)
            after_copies = time_samples_ms(step, dev, warmup=0, iters=args.iters, before_each=probe)
            ms = spread["median_ms"]
            copies = probe.take()
            rows.append(dict(impl=impl, update="sparse" if sparse else "dense", min_ms=spread["min_ms"], ms=ms,
                             max_ms=spread["max_ms"],
                             tokens_per_s=args.tokens / (ms * 1e-3), gbs=least_bytes / (ms * 1e-3) / 1e9,
                             pct_copy=100 * least_bytes / (ms * 1e-3) / 1e9 / copy,
                             pct_paired=paired_pct_copy(least_bytes, after_copies, copies),
                             paired_copy_gbs=statistics.median(copies)))
            del owner, table, opt
            save_json(args.out, payload, quiet=True)
    ref = {(r["impl"], r["update"]): r["ms"] for r in rows}
    for r in rows:
        if r["impl"] == "memory_ext":
            r["x_torch_same_update"] = ref[("torch", r["update"])] / r["ms"]
            r["x_torch_dense"] = ref[("torch", "dense")] / r["ms"]
    print_table(rows, ["impl", "update", "min_ms", "ms", "max_ms", "tokens_per_s", "gbs", "pct_copy", "pct_paired",
                       "x_torch_same_update", "x_torch_dense"])
    payload["complete"] = True
    save_json(args.out, payload)


if __name__ == "__main__":
    main()

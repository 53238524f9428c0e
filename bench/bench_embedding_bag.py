"""Weighted embedding bag: memory_ext vs torch's F.embedding_bag and FBGEMM's TBE.

Bytes per forward = rows read (tokens * bag * dim * elem) + output written + indices +
weights; the backward's least bytes = grad_out once + each touched value row once (the
weight gradient) + each touched row's gradient written once + indices, weights and the
weight gradient. Bandwidth is shown next to the copy bandwidth measured in the same run
(pct_copy) and, call by call, against a 256 MiB copy timed just before each of --iters
more calls (pct_paired: the median of those calls' ratios; paired_copy_gbs: the median of
the copies), which follows the machine's bandwidth where it drifts within a run; the
paired calls run after a copy has evicted the caches and give no times. Each case is warmed up and timed over --iters calls (fwd+bwd steps: at least 5): ms is
the median, min_ms and max_ms the extremes; speed-ups are ratios of medians measured in the
same process.

Inputs are drawn on the device, once per (dtype, dim) for the largest token count; smaller
token counts use the leading tokens. The JSON file is rewritten after every case
("complete": false until the last), so a run stopped early keeps what it measured.
--fresh-process runs each (dtype, dim, tokens) case in a new Python process, which draws its
own inputs and measures its own copy bandwidth (each row then carries its case's copy_gbs):
no case inherits the allocator, page cache or thread-pool state of the cases before it.

    python bench/bench_embedding_bag.py [--device cpu|cuda] [--quick] [--fresh-process]
        [--out bench/out/embedding_bag.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    CopyProbe,
    after_copies,
    copy_bandwidth_gbs,
    machine_info,
    on_table_storage,
    paired_pct_copy,
    print_table,
    recorded_options,
    save_complete,
    save_json,
    spread_ms,
    time_samples_ms,
)

import memory_ext  # noqa: E402
from memory_ext.testing import sample_inputs  # noqa: E402

COLUMNS = ["impl", "op", "dtype", "dim", "tokens", "min_ms", "ms", "max_ms", "gbs", "pct_copy", "pct_paired", "x_torch",
           "x_fbgemm"]


def load_fbgemm():
    try:
        import fbgemm_gpu  # noqa: F401
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen

        return DenseTableBatchedEmbeddingBagsCodegen, PoolingMode
    except Exception as e:  # an optional peer: any import failure means skip it
        print(f"FBGEMM skipped: {type(e).__name__}: {e}")
        return None


# ---------------------------------------------------------------------------------------
# Inputs and traffic.


def draw_inputs(max_tokens, bag, rows, dim, dtype, device) -> dict:
    """values, indices, float32 weights and grad_out for max_tokens, drawn on device; the
    table on huge pages, as memory_ext.MemoryValues allocates it."""
    inputs = sample_inputs("embedding_bag_backward", device, dtype, tokens=max_tokens, bag=bag, rows=rows, dim=dim,
                           weight_dtype=torch.float32)
    inputs["values"] = on_table_storage(inputs["values"])
    return inputs


def leading_tokens(inputs: dict, tokens: int) -> dict:
    """The case of the first ``tokens`` tokens (views; the table is shared)."""
    return dict(values=inputs["values"], indices=inputs["indices"][:tokens], weights=inputs["weights"][:tokens],
                grad_out=inputs["grad_out"][:tokens])


def traffic_bytes(inp: dict) -> tuple[int, int]:
    """Least bytes moved by the forward and by the sparse backward."""
    tokens, bag = inp["indices"].shape
    dim = inp["values"].shape[1]
    elem = inp["values"].element_size()
    fwd = tokens * bag * dim * elem + tokens * dim * elem + tokens * bag * (8 + 4)
    n_unique = int(torch.unique(inp["indices"]).numel())
    # backward: read grad_out once and each touched value row once (for the weight
    # gradient), write each touched row's gradient once, read the indices and weights and
    # write the weight gradient. (grad_out rows are needed once per lookup, but the block
    # is tokens x dim and stays in cache, so counting it per lookup would credit the kernel
    # with bytes it never moved from DRAM.)
    bwd = tokens * dim * elem + n_unique * dim * elem * 2 + tokens * bag * (8 + 4 + 4)
    return fwd, bwd


# ---------------------------------------------------------------------------------------
# Timed calls: each returns [(impl, op, timing samples in ms, bytes or None, the copy
# bandwidth measured just before each sample or None)]. The cases whose bytes are counted
# pair each call with a copy (probe).


def fwd_bwd_step(lookup: Callable, table: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor) -> Callable:
    """A call of lookup(table_leaf, weights_leaf).backward(grad_out) on fresh leaves' grads."""
    table_leaf = table.clone().requires_grad_(True)
    weights_leaf = weights.clone().requires_grad_(True)

    def step():
        table_leaf.grad = None
        weights_leaf.grad = None
        lookup(table_leaf, weights_leaf).backward(grad_out)

    return step


def _ours_lookup(indices, table, weights):
    return memory_ext.embedding_bag(table, indices, weights)


def _ours_fwd_then_bwd(inp):
    memory_ext.embedding_bag(inp["values"], inp["indices"], inp["weights"])
    memory_ext.embedding_bag_backward(inp["grad_out"], inp["values"], inp["indices"], inp["weights"], True)


def _torch_lookup(indices, sparse, table, weights):
    return F.embedding_bag(indices, table, mode="sum", per_sample_weights=weights, sparse=sparse)


def paired(fn: Callable, device: str, iters: int, probe: CopyProbe) -> tuple[list[float], tuple]:
    """Timing samples of fn; then (samples, copies' GB/s) of as many calls each after a copy
    measured by probe. The copy evicts the caches, so the plain samples give the times and
    the paired ones only the shares of copy."""
    return time_samples_ms(fn, device, iters=iters), after_copies(fn, device, iters, probe)


def time_memory_ext(inp: dict, device: str, iters: int, fwd_bytes: int, bwd_bytes: int, probe: CopyProbe) -> list[tuple]:
    v, i, w, g = inp["values"], inp["indices"], inp["weights"], inp["grad_out"]
    fwd = paired(functools.partial(memory_ext.embedding_bag, v, i, w), device, iters, probe)
    bwd = paired(functools.partial(memory_ext.embedding_bag_backward, g, v, i, w, True), device, iters, probe)
    both = paired(functools.partial(_ours_fwd_then_bwd, inp), device, iters, probe)
    dense = time_samples_ms(fwd_bwd_step(functools.partial(_ours_lookup, i), v, w, g), device, iters=max(5, iters // 2))
    return [("memory_ext", "forward", fwd[0], fwd_bytes, fwd[1]), ("memory_ext", "backward (sparse)", bwd[0], bwd_bytes, bwd[1]),
            ("memory_ext", "fwd+bwd sparse", both[0], fwd_bytes + bwd_bytes, both[1]),
            ("memory_ext", "fwd+bwd dense", dense, None, None)]


def time_torch(inp: dict, device: str, iters: int, fwd_bytes: int, probe: CopyProbe) -> list[tuple]:
    # per-sample weights must have the table's dtype
    v, i, g = inp["values"], inp["indices"], inp["grad_out"]
    psw = inp["weights"].to(v.dtype)
    fwd = paired(functools.partial(_torch_lookup, i, False, v, psw), device, iters, probe)
    out = [("torch", "forward", fwd[0], fwd_bytes, fwd[1])]
    for sparse in (True, False):
        step = fwd_bwd_step(functools.partial(_torch_lookup, i, sparse), v, psw, g)
        samples = time_samples_ms(step, device, warmup=1, iters=max(5, iters // 2))
        out.append(("torch", f"fwd+bwd {'sparse' if sparse else 'dense'}", samples, None, None))
    return out


def time_fbgemm(inp: dict, device: str, iters: int, fwd_bytes: int, fbgemm, probe: CopyProbe) -> list[tuple]:
    """FBGEMM's CPU table-batched embedding (float32 only): forward and fwd+bwd dense."""
    v, i, w, g = inp["values"], inp["indices"], inp["weights"], inp["grad_out"]
    if fbgemm is None or device != "cpu" or v.dtype != torch.float32:
        return []
    tbe_class, pooling = fbgemm
    rows, dim = v.shape
    tokens, bag = i.shape
    tbe = tbe_class([(rows, dim)], pooling_mode=pooling.SUM, use_cpu=True)
    with torch.no_grad():
        tbe.weights.copy_(v.reshape(-1))
    flat = i.reshape(-1)
    offsets = torch.arange(0, tokens * bag + 1, bag)
    flat_w = w.reshape(-1).clone().requires_grad_(True)
    fwd = paired(functools.partial(tbe, flat, offsets, per_sample_weights=flat_w.detach()), device, iters, probe)

    def step():  # the table is the module's own parameter
        tbe.weights.grad = None
        flat_w.grad = None
        tbe(flat, offsets, per_sample_weights=flat_w).backward(g)

    both = time_samples_ms(step, device, warmup=1, iters=max(5, iters // 2))
    return [("fbgemm", "forward", fwd[0], fwd_bytes, fwd[1]), ("fbgemm", "fwd+bwd dense", both, None, None)]


# ---------------------------------------------------------------------------------------
# Results.


def case_rows(timings: list[tuple], case: dict, copy_gbs: float) -> list[dict]:
    """Result rows: pct_copy against the run's copy bandwidth (copy_gbs); pct_paired, the
    median over the paired calls of each one's bandwidth against the copy measured just
    before it, and paired_copy_gbs, the median of those copies."""
    rows = []
    for impl, op, samples, nbytes, pairs in timings:
        spread = spread_ms(samples)
        ms = spread["median_ms"]
        gbs = nbytes / (ms * 1e-3) / 1e9 if nbytes else None
        rows.append(dict(impl=impl, op=op, **case, min_ms=spread["min_ms"], ms=ms, max_ms=spread["max_ms"], gbs=gbs,
                         pct_copy=100 * gbs / copy_gbs if gbs else None,
                         pct_paired=paired_pct_copy(nbytes, *pairs) if pairs else None,
                         paired_copy_gbs=statistics.median(pairs[1]) if pairs else None))
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Speed-ups against the peers on the same case: each of our rows against the peer row
    doing the same work (forward; fwd+bwd with a sparse or dense value gradient; FBGEMM's
    CPU path has only the dense one)."""
    peer_op = {"forward": ("forward", "forward"), "fwd+bwd sparse": ("fwd+bwd sparse", "fwd+bwd dense"),
               "fwd+bwd dense": ("fwd+bwd dense", "fwd+bwd dense")}
    ms = {(r["impl"], r["op"]): r["ms"] for r in rows}
    for r in rows:
        if r["impl"] != "memory_ext" or r["op"] not in peer_op:
            continue
        torch_op, fbgemm_op = peer_op[r["op"]]
        if ("torch", torch_op) in ms:
            r["x_torch"] = ms[("torch", torch_op)] / r["ms"]
        if ("fbgemm", fbgemm_op) in ms:
            r["x_fbgemm"] = ms[("fbgemm", fbgemm_op)] / r["ms"]


def bench_case(inp: dict, device: str, iters: int, fbgemm, copy_gbs: float) -> list[dict]:
    """Every implementation on one case: result rows with speed-ups."""
    tokens, bag = inp["indices"].shape
    rows, dim = inp["values"].shape
    fwd_bytes, bwd_bytes = traffic_bytes(inp)
    probe = CopyProbe(device)
    timings = (time_memory_ext(inp, device, iters, fwd_bytes, bwd_bytes, probe)
               + time_torch(inp, device, iters, fwd_bytes, probe) + time_fbgemm(inp, device, iters, fwd_bytes, fbgemm, probe))
    del probe
    case = dict(dtype=str(inp["values"].dtype).replace("torch.", ""), tokens=tokens, bag=bag, rows=rows, dim=dim)
    out = case_rows(timings, case, copy_gbs)
    add_speedups(out)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=None)
    p.add_argument("--bag", type=int, default=128)
    p.add_argument("--rows", type=int, default=None, help="table rows (default 2^20; --quick: 4096)")
    p.add_argument("--dims", type=int, nargs="+", default=None)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=None, help="timed calls per measurement (default 7; --quick: 3)")
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke run of a few seconds")
    p.add_argument("--fresh-process", action="store_true",
                   help="run each (dtype, dim, tokens) case in a new process with its own copy bandwidth")
    p.add_argument("--out", default="bench/out/embedding_bag.json")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.tokens, args.dims = args.tokens or [256], args.dims or [64]
        args.bag = min(args.bag, 32)
    args.tokens = args.tokens or ([16384, 65536] if cuda else [4096])
    args.dims = args.dims or ([1024, 4096] if cuda else [512])
    args.rows = args.rows or (4096 if args.quick else 1 << 20)
    args.iters = args.iters or (3 if args.quick else 7)
    return args


def case_in_fresh_process(args, dtype_name: str, dim: int, tokens: int) -> list[dict]:
    """One case run by a new process of this script; its rows, each with the copy bandwidth
    that process measured."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "case.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--dtypes", dtype_name,
               "--dims", str(dim), "--tokens", str(tokens), "--bag", str(args.bag), "--rows", str(args.rows),
               "--iters", str(args.iters), "--out", out] + (["--quick"] if args.quick else [])
        subprocess.run(cmd, check=True)
        case = json.loads(open(out).read())
    return [dict(r, copy_gbs=case["copy_gbs"]) for r in case["results"]]


def each_case(args):
    """(dtype name, dim, tokens) of every case, in the order both modes run them."""
    for dtype_name in args.dtypes:
        for dim in args.dims:
            for tokens in sorted(args.tokens):
                yield dtype_name, dim, tokens


def new_payload(args, info: dict, copy_gbs: float | None) -> dict:
    return dict(benchmark="embedding_bag", machine=info, copy_gbs=copy_gbs, config=recorded_options(args), complete=False,
                results=[])


def main_fresh_processes(args) -> None:
    info = machine_info(args.device)
    print(f"device {args.device} ({info.get('gpu', info['cpu'])}), threads {info['threads']}; "
          "each case in a fresh process")
    payload = new_payload(args, info, None)
    for case in each_case(args):
        payload["results"].extend(case_in_fresh_process(args, *case))
        save_json(args.out, payload, quiet=True)
    save_complete(args.out, payload, COLUMNS + ["copy_gbs"])


def main(argv=None):
    args = parse_args(argv)
    if args.fresh_process:
        return main_fresh_processes(args)
    fbgemm = load_fbgemm() if not args.device.startswith("cuda") else None
    info = machine_info(args.device)
    copy = copy_bandwidth_gbs(args.device, nbytes=(1 << 26) if args.quick else (1 << 30))
    print(f"device {args.device} ({info.get('gpu', info['cpu'])}), threads {info['threads']}, "
          f"copy bandwidth {copy:.1f} GB/s")
    payload = new_payload(args, info, copy)
    drawn, inputs = None, None  # the inputs of one (dtype, dim), shared by its token counts
    for dtype_name, dim, tokens in each_case(args):
        if drawn != (dtype_name, dim):
            inputs = None  # the previous table freed before the next is drawn
            inputs = draw_inputs(max(args.tokens), args.bag, args.rows, dim, getattr(torch, dtype_name), args.device)
            drawn = (dtype_name, dim)
        rows = bench_case(leading_tokens(inputs, tokens), args.device, args.iters, fbgemm, copy)
        payload["results"].extend(rows)
        save_json(args.out, payload, quiet=True)
        print_table(rows, COLUMNS)
    save_complete(args.out, payload, COLUMNS)


if __name__ == "__main__":
    main()

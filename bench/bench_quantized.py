"""Quantized value tables: the weighted bag of uint8 and float8 e4m3 rows against float32 and
bfloat16 tables, and against torch's (FBGEMM's) byte row-wise bag on the same packed table.

Cases, at one shape (default: tokens 4096, bag 128, rows 2^20, dim 512, the bench_embedding_bag
shape), all reading the same lookups:

- fp32 / bf16: memory_ext.ops.embedding_bag on a float32 / bfloat16 table;
- uint8 / e4m3: memory_ext.ops.quantized_embedding_bag on quantize_rows of the float32 table
  (rows of dim + 8 / dim + 4 bytes);
- torch_uint8: torch.ops.quantized.embedding_bag_byte_rowwise_offsets on the very same uint8
  packed table (the same layout), with per-sample weights;
- torch_fp32: torch.nn.functional.embedding_bag (mode "sum", per-sample weights) on the
  float32 table.

Bytes per call = rows read (tokens * bag * row bytes) + indices + weights + the float32 output
written; GB/s is shown next to the copy bandwidth measured in the same run (pct_copy), and
against copies paired with calls: after the timed rounds each case runs --rounds * --iters
more calls, each right after a 256 MiB copy timed the moment before (pct_paired: the median
of those calls' shares of their copies; paired_copy_gbs: the median copy), so that a share
does not depend on when in a drifting machine's run its one copy was measured. The cases are timed
in rounds (every case once per round, in turn), so each round's ratios compare calls made side
by side; ratios are reported as min/median/max over rounds.

    python bench/bench_quantized.py [--device cpu|cuda] [--quick] [--threads 2] [--rounds 5] [--out FILE]

On CUDA the torch_uint8 peer is left out (torch's byte row-wise bag is a CPU kernel); the
default output is bench/results/quantized_<device>.json.
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
    after_copies,
    copy_bandwidth_gbs,
    machine_info,
    on_table_storage,
    paired_pct_copy,
    print_table,
    recorded_options,
    save_json,
    spread_ms,
    time_samples_ms,
)

from memory_ext import ops  # noqa: E402
from memory_ext.nn import quantize_rows  # noqa: E402

COLUMNS = ["case", "row_bytes", "median_ms", "min_ms", "max_ms", "gbs", "pct_copy", "pct_paired", "paired_copy_gbs",
           "x_fp32", "x_fp32_min", "x_fp32_max"]
# Issue targets for the uint8 case: >= 2.5x the float32 table, >= 80% of the copy bandwidth.
TARGET_X_FP32, TARGET_PCT_COPY = 2.5, 80.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=None, help="default 4096 (--quick: 64)")
    p.add_argument("--bag", type=int, default=None, help="default 128 (--quick: 16)")
    p.add_argument("--rows", type=int, default=None, help="default 2^20 (--quick: 4096)")
    p.add_argument("--dim", type=int, default=None, help="default 512 (--quick: 64)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None, help="default 5 (--quick: 2)")
    p.add_argument("--iters", type=int, default=3, help="timed calls per case per round")
    p.add_argument("--no-torch", action="store_true", help="skip the torch peers (slow at the full shape)")
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke run of a few seconds")
    p.add_argument("--out", default=None, help="default bench/results/quantized_<device>.json")
    args = p.parse_args(argv)
    args.out = args.out or f"bench/results/quantized_{args.device}.json"
    q = args.quick
    args.tokens = args.tokens or (64 if q else 4096)
    args.bag = args.bag or (16 if q else 128)
    args.rows = args.rows or (4096 if q else 1 << 20)
    args.dim = args.dim or (64 if q else 512)
    args.rounds = args.rounds or (2 if q else 5)
    return args


def build_cases(args) -> dict:
    """case name -> (callable, bytes per table row)."""
    g, dev = torch.Generator().manual_seed(0), args.device
    fp32 = on_table_storage(torch.randn(args.rows, args.dim, generator=g).to(dev))
    bf16 = on_table_storage(fp32.bfloat16())
    uint8 = quantize_rows(fp32, "uint8")
    e4m3 = quantize_rows(fp32, "float8_e4m3fn")
    indices = torch.randint(0, args.rows, (args.tokens, args.bag), generator=g).to(dev)
    weights = torch.rand(args.tokens, args.bag, generator=g).to(dev)
    flat_idx, flat_w = indices.reshape(-1), weights.reshape(-1)
    offsets = torch.arange(0, args.tokens * args.bag, args.bag, device=dev)
    cases = {
        "fp32": (lambda: ops.embedding_bag(fp32, indices, weights), args.dim * 4),
        "bf16": (lambda: ops.embedding_bag(bf16, indices, weights), args.dim * 2),
        "uint8": (lambda: ops.quantized_embedding_bag(uint8, indices, weights, "uint8"), uint8.shape[1]),
        "e4m3": (lambda: ops.quantized_embedding_bag(e4m3, indices, weights, "float8_e4m3fn"), e4m3.shape[1]),
    }
    if not args.no_torch and dev == "cpu":  # torch's byte row-wise bag has no CUDA kernel
        cases["torch_uint8"] = (
            lambda: torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                uint8, flat_idx, offsets, mode=0, per_sample_weights=flat_w, include_last_offset=False
            ),
            uint8.shape[1],
        )
    if not args.no_torch:
        cases["torch_fp32"] = (
            lambda: F.embedding_bag(flat_idx, fp32, offsets, mode="sum", per_sample_weights=flat_w), args.dim * 4
        )
    # Every case reads the same rows: check the quantized ones against the float table once.
    ref = cases["fp32"][0]()
    for name in ("uint8", "e4m3", "torch_uint8"):
        if name in cases:
            err = (cases[name][0]().float() - ref).abs().max().item()
            bound = ref.abs().max().item() * (0.02 if name != "e4m3" else 0.1)
            assert err <= bound, f"bench_quantized: {name} differs from the float32 bag by {err} (> {bound})"
    return cases


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(args.device)
    print(f"{args.device} {info.get('gpu', info['cpu'])}, threads {info['threads']}; tokens {args.tokens}, bag {args.bag}, rows {args.rows}, "
          f"dim {args.dim}")
    copy = copy_bandwidth_gbs(args.device, nbytes=(1 << 26) if args.quick else (1 << 30))
    print(f"copy bandwidth {copy:.1f} GB/s")
    cases = build_cases(args)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    round_ms: list[dict[str, float]] = []
    for _ in range(args.rounds):
        this_round = {}
        for name, (fn, _) in cases.items():
            s = time_samples_ms(fn, args.device, warmup=1, iters=args.iters)
            samples[name] += s
            this_round[name] = statistics.median(s)
        round_ms.append(this_round)
    probe = CopyProbe(args.device, nbytes=(1 << 24) if args.quick else (1 << 28))
    pairs = {name: after_copies(fn, args.device, args.rounds * args.iters, probe) for name, (fn, _) in cases.items()}
    lookups = args.tokens * args.bag
    results = []
    for name, (_, row_bytes) in cases.items():
        spread = spread_ms(samples[name])
        nbytes = lookups * (row_bytes + 8 + 4) + args.tokens * args.dim * 4
        ratios = [r["fp32"] / r[name] for r in round_ms]
        results.append(dict(
            case=name, row_bytes=row_bytes, **spread, bytes=nbytes, gbs=nbytes / spread["median_ms"] / 1e6,
            pct_copy=100 * nbytes / spread["median_ms"] / 1e6 / copy, pct_paired=paired_pct_copy(nbytes, *pairs[name]),
            paired_copy_gbs=statistics.median(pairs[name][1]), x_fp32=statistics.median(ratios),
            x_fp32_min=min(ratios), x_fp32_max=max(ratios),
        ))
    uint8 = next(r for r in results if r["case"] == "uint8")
    targets = [
        dict(target=f"uint8 >= {TARGET_X_FP32}x fp32 (median of rounds)", value=uint8["x_fp32"],
             met=uint8["x_fp32"] >= TARGET_X_FP32),
        dict(target=f"uint8 >= {TARGET_PCT_COPY:.0f}% of copy bandwidth by bytes read (paired)",
             value=uint8["pct_paired"], met=uint8["pct_paired"] >= TARGET_PCT_COPY),
    ]
    if "torch_uint8" in cases:
        peer = [r["torch_uint8"] / r["uint8"] for r in round_ms]
        uint8["x_torch_uint8"] = statistics.median(peer)
        print(f"uint8 vs torch's byte row-wise bag on the same table: {min(peer):.2f}x / {statistics.median(peer):.2f}x"
              f" / {max(peer):.2f}x (min/median/max over rounds)")
    print_table(results, COLUMNS)
    for t in targets:
        print(f"target {t['target']}: {t['value']:.3g} -> {'met' if t['met'] else 'NOT met'}")
    save_json(args.out, dict(benchmark="quantized", machine=info, config=recorded_options(args), copy_gbs=copy, results=results,
                             rounds_ms=round_ms, target_checks=targets, complete=True))


if __name__ == "__main__":
    main()

"""Markdown tables of the C++ benchmarks' results, from the JSON they write (Google
Benchmark's format), and the C++ and Python numbers of the same cases side by side.

    python bench/cpp_tables.py CPP_JSON... [--python PY_JSON...]

The first table has one row per case: median milliseconds with min and max over the
repetitions, GB/s and % of the copy bandwidth measured in the same process, and, on
memory_ext's rows, the speed-up over the peer doing the same work (torch's op, or the
pk_topk reference). The second, with --python, puts the median of each case that the
Python benchmarks (bench/bench_embedding_bag.py, bench_pk_topk.py, bench_value_update.py)
measured next to the C++ one: the difference is what the Python call, the dispatcher
from Python and autograd add. README's C++ table is this script's output.
"""
from __future__ import annotations

import argparse
import json
import sys

# C++ op name -> the Python benchmarks' op name, per benchmark.
PY_OP = {"forward": "forward", "backward_sparse": "backward (sparse)", "fwd_bwd_sparse": "fwd+bwd sparse",
         "pk_topk": "pk_topk", "step_adam": "sparse step"}
PEER = {"memory_ext": ("torch", "reference")}


def parse_name(run_name: str) -> dict:
    """'impl/op/dtype/key:value/.../real_time' -> {impl, op, dtype, key: int, ...}."""
    parts = [p for p in run_name.split("/") if p not in ("real_time", "manual_time")
             and not p.startswith("iterations:")]
    case = {"impl": parts[0], "op": parts[1], "dtype": parts[2]}
    for p in parts[3:]:
        key, _, value = p.partition(":")
        case[key] = int(value)
    return case


def load_cpp(paths: list[str]) -> tuple[list[dict], dict]:
    """Cases with median/min/max ms and counters, and the first file's context."""
    cases: dict[str, dict] = {}
    context = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        context = context or data.get("context", {})
        for b in data["benchmarks"]:
            if b.get("run_type") != "aggregate" and b.get("repetitions", 1) > 1:
                continue
            name = b["run_name"]
            row = cases.setdefault(name, {**parse_name(name), "copy_gbs": float(data["context"]["copy_gbs"])})
            scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b["time_unit"]]
            stat = b.get("aggregate_name", "median")
            if stat in ("median", "min", "max"):
                row[f"{stat}_ms"] = b["real_time"] * scale
            if stat == "median":
                row["gbs"] = b.get("bytes_per_second", 0) / 1e9 or None
                row["pct_copy"] = b.get("pct_copy")
    rows = list(cases.values())
    for r in rows:
        r.setdefault("min_ms", r["median_ms"])
        r.setdefault("max_ms", r["median_ms"])
    return rows, context


def shape_key(r: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in r.items() if isinstance(v, int) or k == "dtype"))


def add_peer_ratios(rows: list[dict]) -> None:
    by_case = {(r["impl"], r["op"], shape_key(r)): r for r in rows}
    for r in rows:
        for peer in PEER.get(r["impl"], ()):
            other = by_case.get((peer, r["op"], shape_key(r)))
            if other:
                r["x_peer"] = other["median_ms"] / r["median_ms"]
                r["peer"] = peer


def shape_text(r: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in r.items() if isinstance(v, int) and not isinstance(v, bool))


def cpp_table(rows: list[dict], context: dict) -> str:
    lines = [f"C++ benchmarks on {context.get('cpu', '?')} ({context.get('threads', '?')} threads, "
             f"commit {context.get('commit', '?')}), copy bandwidth {float(context.get('copy_gbs', 0)):.1f} GB/s:",
             "", "| op | dtype | shape | impl | median ms (min-max) | GB/s | % of copy | x peer |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gbs = f"{r['gbs']:.1f}" if r.get("gbs") else "-"
        pct = f"{r['pct_copy']:.0f}%" if r.get("pct_copy") else "-"
        ratio = f"{r['x_peer']:.2f}x vs {r['peer']}" if "x_peer" in r else ""
        lines.append(f"| {r['op']} | {r['dtype']} | {shape_text(r)} | {r['impl']} | {r['median_ms']:.3g} "
                     f"({r['min_ms']:.3g}-{r['max_ms']:.3g}) | {gbs} | {pct} | {ratio} |")
    return "\n".join(lines)


def python_rows(paths: list[str]) -> list[dict]:
    """The Python benchmarks' rows with their case fields, one list for all files."""
    out = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for r in data["results"]:
            row = dict(r)
            if data.get("benchmark") == "value_update":
                row.update(dtype="float32", op=f"{r['update']} step", **{k: data["config"][k] for k in ("rows", "dim", "tokens")})
            elif data.get("benchmark") == "pk_topk":
                row["op"] = "pk_topk"
            out.append(row)
    return out


def side_by_side(cpp: list[dict], py: list[dict]) -> str:
    lines = ["| op | dtype | shape | impl | C++ median ms | Python median ms | Python - C++ |", "|---|---|---|---|---|---|---|"]
    for r in cpp:
        op = PY_OP.get(r["op"])
        if op is None:
            continue
        keys = {k: v for k, v in r.items() if isinstance(v, int) and not isinstance(v, bool)}
        match = [p for p in py if p.get("impl") == r["impl"] and p.get("op") == op and p.get("dtype") == r["dtype"]
                 and all(p.get(k) == v for k, v in keys.items())]
        if not match:
            continue
        p_ms = match[0]["ms"]
        diff = p_ms - r["median_ms"]
        lines.append(f"| {r['op']} | {r['dtype']} | {shape_text(r)} | {r['impl']} | {r['median_ms']:.3g} | {p_ms:.3g} "
                     f"| {diff:+.3g} ms ({100 * diff / r['median_ms']:+.0f}%) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cpp", nargs="+", help="JSON files the C++ benchmarks wrote (--json FILE)")
    p.add_argument("--python", nargs="*", default=[], help="JSON files of the Python benchmarks on the same machine")
    args = p.parse_args(argv)
    rows, context = load_cpp(args.cpp)
    add_peer_ratios(rows)
    print(cpp_table(rows, context))
    if args.python:
        print()
        print(side_by_side(rows, python_rows(args.python)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

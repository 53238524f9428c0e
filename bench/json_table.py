"""A Markdown table of a benchmark's JSON results, the way README's tables are made.

    python bench/json_table.py bench/results/embedding_bag_cpu.json \
        --columns impl op dtype min_ms ms max_ms pct_copy x_torch [--where dtype=bfloat16]

Prints the machine line (CPU, threads, copy bandwidth, commit) and one row per result,
numbers to three significant digits; a result without a column shows "-".
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import format_value as fmt  # noqa: E402


def matches(result: dict, where: list[str]) -> bool:
    """Every key=value in where holds for result (values compared as text)."""
    for cond in where:
        key, _, value = cond.partition("=")
        if fmt(result.get(key)) != value:
            return False
    return True


def table(payload: dict, columns: list[str], where: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in payload["results"]:
        if matches(r, where):
            lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def machine_line(payload: dict) -> str:
    m = payload.get("machine", {})
    copy = payload.get("copy_gbs")
    copy_text = f", copy {copy:.1f} GB/s" if isinstance(copy, float) else ""
    return (f"{m.get('cpu', m.get('gpu', '?'))}, {m.get('threads', '?')} threads{copy_text}, "
            f"torch {m.get('torch', '?')}, commit {m.get('commit', '?')}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("--columns", nargs="+", required=True)
    p.add_argument("--where", nargs="*", default=[], help="key=value filters on the results")
    args = p.parse_args(argv)
    with open(args.json) as f:
        payload = json.load(f)
    print(machine_line(payload))
    print()
    print(table(payload, args.columns, args.where))


if __name__ == "__main__":
    main()

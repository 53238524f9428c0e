"""The demo over several seeds: how robust its headline is.

    python -m memory_ext.demo seeds [--seeds 0,1,2,3,4] [--out DIR] [--reuse] [demo options...]

Runs the demo (memory_ext.demo, every option passed on) once per seed, each into
DIR/seed<N>/, and writes DIR/seeds.json: per seed the held-out accuracy of every model,
Memory+'s ratio to dense and to dense-2x, and the step-time ratio; their min / median /
max over the seeds; and the table printed at the end (markdown, as README shows it).

With --reuse, a seed whose DIR/seed<N>/results.json exists is read instead of run, after
checking that it was made with the same demo options; so the seeds can run as separate
processes at once (`python -m memory_ext.demo --seed N --out DIR/seedN ...`, one thread
each: a demo's results depend on its thread count, not on the load) and be summarised
afterwards.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

__all__ = ["main", "table"]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m memory_ext.demo seeds", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    p.add_argument("--out", default="demo_seeds_out")
    p.add_argument("--reuse", action="store_true", help="read seeds already run into DIR instead of running them")
    return p.parse_known_args(argv)


def saved_report(seed_dir: Path, demo_argv: list[str], seed: int) -> dict | None:
    """The demo's results.json in seed_dir, or None if there is none; an error if it was
    made with other options than demo_argv and seed."""
    from memory_ext import demo
    from memory_ext.provenance import recorded_options

    path = seed_dir / "results.json"
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    wanted = recorded_options(demo.parse_args(demo_argv + ["--seed", str(seed), "--out", str(seed_dir)]))
    if report.get("config") != wanted:
        differ = sorted(k for k in set(wanted) | set(report.get("config", {}))
                        if wanted.get(k) != report.get("config", {}).get(k))
        raise SystemExit(f"demo seeds --reuse: {path} was made with other options ({', '.join(differ)} differ); "
                         "remove it or run without --reuse")
    return report


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def per_seed(seed: int, report: dict) -> dict:
    """One seed's row: accuracies (%) and Memory+'s ratios."""
    models = report["models"]
    row = {"seed": seed, **{f"{name}_accuracy": 100 * r["accuracy"] for name, r in models.items()}}
    if "memory+" in models:
        mem = models["memory+"]["accuracy"]
        for ref in ("dense", "dense-2x"):
            if ref in models:
                row[f"memory_over_{ref}"] = _ratio(mem, models[ref]["accuracy"])
        if "memory_over_dense_step_time" in report:
            row["step_time_ratio"] = report["memory_over_dense_step_time"]
    return row


def spread(rows: list[dict]) -> dict:
    """min / median / max over the seeds of every numeric column."""
    keys = [k for k in rows[0] if k != "seed"]
    return {k: {"min": min(r[k] for r in rows), "median": statistics.median(r[k] for r in rows),
                "max": max(r[k] for r in rows)} for k in keys}


def table(rows: list[dict]) -> str:
    """Markdown table: one line per seed, then min / median / max."""
    keys = [k for k in rows[0] if k != "seed"]
    fmt = lambda k, v: f"{v:.1f}" if k.endswith("accuracy") else f"{v:.2f}x"  # noqa: E731
    lines = ["| seed | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {r['seed']} | " + " | ".join(fmt(k, r[k]) for k in keys) + " |" for r in rows]
    for stat in ("min", "median", "max"):
        s = spread(rows)
        lines.append(f"| {stat} | " + " | ".join(fmt(k, s[k][stat]) for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from memory_ext import demo

    args, demo_argv = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    rows, reports = [], {}
    for seed in (int(s) for s in args.seeds.split(",")):
        report = saved_report(out / f"seed{seed}", demo_argv, seed) if args.reuse else None
        print(f"seed {seed}" + (" (reused)" if report is not None else ""), file=sys.stderr)
        if report is None:
            report = demo.main(demo_argv + ["--seed", str(seed), "--out", str(out / f"seed{seed}")])
        reports[seed] = report
        rows.append(per_seed(seed, report))
    result = {"demo_options": demo_argv, "seeds": rows, "spread": spread(rows), "table": table(rows),
              "config": reports[rows[0]["seed"]]["config"], "machine": reports[rows[0]["seed"]]["machine"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(result, indent=1))
    print(result["table"])
    print(f"wrote {out / 'seeds.json'}")
    return result


if __name__ == "__main__":
    main()

"""Accuracy against memory size at fixed FLOPs: the paper's Figure 1 in small.

    python -m memory_ext.demo sweep [--n-keys 32,64,128,256,512] [--seeds 0,1]
                                    [--entities 1000] [--no-dense] [--out DIR] [demo options...]
    python -m memory_ext.demo sweep --merge A/sweep.json B/sweep.json [--out DIR]

For each seed, trains dense and dense-2x once and Memory+ once per n_keys (n_keys^2 value
rows; heads, k and every other option the same, so FLOPs per token barely change), each
with the same budget (--steps / --seconds, passed on to the demo; 2000 steps unless given:
the demo's 800 are too few for a fact set this size). Writes DIR/sweep.json
(every run's accuracy, seen-template accuracy, memory parameters and step time) and
DIR/sweep.png: held-out and seen-template accuracy against memory parameters (log x), the
dense models as horizontal lines, and Memory+'s step time per size.

--no-dense skips the dense references (for sizes added to a sweep run before); --merge
combines the points of sweeps run separately with the same options into one sweep.json and
plot (a merged file merges again), refusing files whose fact set or demo options differ and
sweep options that a merge would ignore (--n-keys, --seeds, --entities, --no-dense).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from memory_ext.provenance import recorded_options

__all__ = ["main"]

DEFAULT_STEPS = 2000


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m memory_ext.demo sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--n-keys", default="32,64,128,256,512", help="comma-separated sub-key counts")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--entities", type=int, default=1000, help="entities of the (harder) fact set")
    p.add_argument("--no-dense", dest="dense", action="store_false",
                   help="train only Memory+ (the dense references come from another sweep, see --merge)")
    p.add_argument("--merge", nargs="+", metavar="SWEEP_JSON", default=None,
                   help="combine the points of these sweep.json files instead of training")
    p.add_argument("--out", default="demo_sweep_out")
    args, demo_argv = p.parse_known_args(argv)
    if args.merge:
        # What a merge takes from its files; given on the command line too, it would be ignored.
        ignored = [o for o in ("--n-keys", "--seeds", "--entities", "--no-dense")
                   if any(a == o or a.startswith(o + "=") for a in argv)]
        if ignored:
            raise SystemExit(f"sweep --merge: {', '.join(ignored)} would have no effect: a merge takes its sizes, "
                             "seeds and fact set from the files")
    if not args.merge and not {"--steps", "--seconds"} & {a.split("=")[0] for a in demo_argv}:
        demo_argv = ["--steps", str(DEFAULT_STEPS)] + demo_argv
    return args, demo_argv


def _point(name: str, r: dict, n_keys: int | None) -> dict:
    return {"model": name, "n_keys": n_keys, "memory_params": r["memory_params"], "params": r["params"],
            "flops_per_token": r["flops_per_token"], "accuracy": r["accuracy"],
            "accuracy_seen_template": r["accuracy_seen_template"], "step_ms": r["step_ms_in_training"]}


def run(args: argparse.Namespace, demo_argv: list[str]) -> tuple[list[dict], dict]:
    """Every run's point, and the machine (versions, commit) the first run recorded."""
    from memory_ext import demo

    out, points, machine = Path(args.out), [], {}
    common = demo_argv + ["--entities", str(args.entities), "--timing-rounds", "0"]
    for seed in (int(s) for s in args.seeds.split(",")):
        base = common + ["--seed", str(seed)]
        if args.dense:
            report = demo.main(base + ["--models", "dense,dense-2x", "--out", str(out / f"seed{seed}_dense")])
            machine = machine or report["machine"]
            points += [dict(_point(name, r, None), seed=seed) for name, r in report["models"].items()]
        for n_keys in (int(n) for n in args.n_keys.split(",")):
            report = demo.main(base + ["--models", "memory+", "--n-keys", str(n_keys),
                                       "--out", str(out / f"seed{seed}_nkeys{n_keys}")])
            machine = machine or report["machine"]
            points.append(dict(_point("memory+", report["models"]["memory+"], n_keys), seed=seed))
    return points, machine


def read_sweep(path: str) -> dict:
    """One sweep.json (of a sweep run or of a merge), or SystemExit naming the problem."""
    try:
        sweep = json.loads(Path(path).read_text())
    except OSError as e:
        raise SystemExit(f"sweep --merge: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"sweep --merge: {path} is not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(sweep, dict):
        raise SystemExit(f"sweep --merge: {path} is not a sweep.json")
    keys = ("points", "demo_options", "merged_from") if "merged_from" in sweep else ("points", "demo_options", "options", "machine")
    missing = [k for k in keys if k not in sweep]
    if missing:
        raise SystemExit(f"sweep --merge: {path} is not a sweep.json: it has no {', '.join(missing)}")
    return sweep


def merge(paths: list[str]) -> tuple[list[dict], list[dict], list[str]]:
    """The points of several sweep.json files, each run's machine and options, and the demo options.

    Points are comparable only when every file trained the same fact set with the same demo
    options (budget, model shape); a file that differs, or a (model, n_keys, seed) measured
    twice, is refused rather than averaged in. A merged file's runs are listed as its own.
    """
    points, sources, demo_options, entities = [], [], None, None
    seen: set[tuple] = set()
    for path in paths:
        sweep = read_sweep(path)
        runs = sweep.get("merged_from") or [{"file": Path(path).name, "machine": sweep["machine"], "options": sweep["options"]}]
        for source in runs:
            if demo_options is None:
                demo_options, entities = sweep["demo_options"], source["options"]["entities"]
            if sweep["demo_options"] != demo_options or source["options"]["entities"] != entities:
                raise SystemExit(f"sweep --merge: {path} was run with entities {source['options']['entities']} and demo "
                                 f"options {sweep['demo_options']}, the first file with {entities} and {demo_options}")
        for p in sweep["points"]:
            key = (p["model"], p["n_keys"], p["seed"])
            if key in seen:
                raise SystemExit(f"sweep --merge: {key} (model, n_keys, seed) appears in more than one file")
            seen.add(key)
            points.append(p)
        sources.extend(runs)
    return points, sources, demo_options


def by_size(points: list[dict]) -> list[dict]:
    """Memory+ points averaged over seeds, one per n_keys, ascending."""
    sizes = sorted({p["n_keys"] for p in points if p["model"] == "memory+"})
    rows = []
    for n in sizes:
        mine = [p for p in points if p["model"] == "memory+" and p["n_keys"] == n]
        rows.append({"n_keys": n, "memory_params": mine[0]["memory_params"],
                     **{k: statistics.mean(p[k] for p in mine) for k in ("accuracy", "accuracy_seen_template", "step_ms")}})
    return rows


def plot(points: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = by_size(points)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    x = [r["memory_params"] for r in rows]
    for ax, key, title in ((axes[0], "accuracy", "held-out templates"), (axes[1], "accuracy_seen_template", "seen templates")):
        ax.plot(x, [100 * r[key] for r in rows], "o-", label="Memory+ (mean over seeds)")
        for p in points:
            if p["model"] == "memory+":
                ax.plot(p["memory_params"], 100 * p[key], ".", color="C0", alpha=0.4)
        for i, name in enumerate(("dense", "dense-2x")):
            mine = [p[key] for p in points if p["model"] == name]
            if mine:
                ax.axhline(100 * statistics.mean(mine), color=f"C{i + 1}", ls="--", label=name)
        ax.set(xscale="log", xlabel="memory parameters", ylabel="accuracy (%)", title=title)
        ax.legend()
    axes[2].plot(x, [r["step_ms"] for r in rows], "o-")
    axes[2].set(xscale="log", xlabel="memory parameters", ylabel="Memory+ ms per step", ylim=(0, None))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    args, demo_argv = parse_args(sys.argv[1:] if argv is None else argv)
    if args.merge:
        if demo_argv:
            raise SystemExit(f"sweep --merge: demo options {demo_argv} have no effect on a merge")
        points, sources, demo_argv = merge(args.merge)
        provenance = {"merged_from": sources}
    else:
        points, machine = run(args, demo_argv)
        provenance = {"machine": machine, "options": recorded_options(args)}
    rows = by_size(points)
    result = {**provenance, "demo_options": demo_argv, "points": points, "memory_plus_by_size": rows,
              "step_time_largest_over_smallest": rows[-1]["step_ms"] / rows[0]["step_ms"] if rows else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    plotted = plot(points, out / "sweep.png")
    for r in rows:
        print(f"n_keys {r['n_keys']:4d}  memory {r['memory_params'] / 1e6:7.2f}M  held-out {100 * r['accuracy']:5.1f}%  "
              f"seen {100 * r['accuracy_seen_template']:5.1f}%  {r['step_ms']:6.1f} ms/step")
    print(f"wrote {out / 'sweep.json'}" + (f" and {out / 'sweep.png'}" if plotted else ""))
    return result


if __name__ == "__main__":
    main()

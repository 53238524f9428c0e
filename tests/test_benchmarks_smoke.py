"""Each Python benchmark runs end to end on a tiny shape (--quick) and writes its JSON:
a smoke run, not a timing, so that a broken benchmark fails here rather than on a
borrowed GPU."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_run(name: str, out, *options: str) -> dict:
    """bench/bench_<name>.py --quick --out out -> its JSON, checked complete and with a commit."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", f"bench_{name}.py"), "--quick", "--out", str(out), *options],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report.get("complete") is True, report.keys()
    assert report["machine"]["commit"], report["machine"]
    assert report["results"], report
    return report


@pytest.mark.parametrize("name", ["embedding_bag", "pk_topk", "value_update", "quantized"])
def test_benchmark_quick_run_writes_complete_json(name, tmp_path):
    report = quick_run(name, tmp_path / f"{name}.json")
    if name in ("value_update", "quantized"):  # every step's or case's share of copy also paired with copies
        assert all(r["pct_paired"] > 0 and r["paired_copy_gbs"] > 0 for r in report["results"]), report["results"]


def test_embedding_bag_fresh_process_runs_each_case_apart(tmp_path):
    report = quick_run("embedding_bag", tmp_path / "fresh.json", "--fresh-process", "--dtypes", "float32", "bfloat16")
    assert report["copy_gbs"] is None and report["config"]["fresh_process"] is True
    assert {r["dtype"] for r in report["results"]} == {"float32", "bfloat16"}
    # every row names the copy bandwidth of its own process, and its % of copy uses it
    for r in report["results"]:
        assert r["copy_gbs"] > 0
        if r["gbs"] is not None:
            assert abs(r["pct_copy"] - 100 * r["gbs"] / r["copy_gbs"]) < 1e-6 * r["pct_copy"]


def test_scaling_quick_run_measures_every_installed_peer(tmp_path):
    report = quick_run("scaling", tmp_path / "scaling.json")
    assert (tmp_path / "scaling.png").stat().st_size > 0
    rows = report["results"]
    configurations = {(shape, log2_n) for shape in ("heads1_k32", "heads4_k32") for log2_n in (14, 16)}
    pkm = importlib.util.find_spec("product_key_memory") is not None
    installed = {"sparse": True, "dense": True, "torch": True, "fused": True, "fused_adagrad": True, "pkm": pkm}
    for peer, present in installed.items():
        mine = [r for r in rows if r["peer"] == peer]
        assert {(r["shape"], r["log2_n"]) for r in mine} == configurations, peer
        for r in mine:
            if not present:  # the optional package: its peer is skipped, saying how to install it
                assert r["status"] == "skipped" and "pip install product-key-memory" in r["reason"], r
                continue
            assert r["status"] == "ok", r
            assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"], r
            assert r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0, r
            assert r["configuration"], r
    checks = report["target_checks"]
    assert len(checks) == 6 and all(c["met"] in (True, False, None) for c in checks), checks


def test_embedding_bag_pairs_each_counted_case_with_copies(tmp_path):
    report = quick_run("embedding_bag", tmp_path / "paired.json", "--dtypes", "float32")
    for r in report["results"]:
        counted = r["gbs"] is not None
        assert (r["pct_paired"] is not None) == counted and (r["paired_copy_gbs"] is not None) == counted, r
        if counted:
            assert r["pct_paired"] > 0 and r["paired_copy_gbs"] > 0, r


def test_paired_pct_copy_is_the_median_of_each_calls_share():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from common import paired_pct_copy

    # 1 GB in 100, 50 and 25 ms: 10, 20 and 40 GB/s, against copies of 20, 20 and 40 GB/s
    assert paired_pct_copy(10**9, [100.0, 50.0, 25.0], [20.0, 20.0, 40.0]) == 100.0
    assert paired_pct_copy(10**9, [100.0, 100.0, 100.0], [40.0, 20.0, 10.0]) == 50.0

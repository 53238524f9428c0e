"""A few steps of the demo at tiny sizes: it trains the three models and writes its results."""
import json

from memory_ext import demo

TINY = ["--steps", "3", "--entities", "12", "--dim", "32", "--layers", "3", "--heads", "2", "--n-keys", "8",
        "--mem-heads", "2", "--topk", "4", "--batch", "2", "--seq", "16", "--eval-every", "2", "--eval-subset", "8", "--timing-rounds", "2"]


def test_demo_smoke(tmp_path, capsys):
    report = demo.main(TINY + ["--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"].keys() == {"dense", "memory+", "dense-2x"} == report["models"].keys()
    dense, mem, big = (saved["models"][k] for k in ("dense", "memory+", "dense-2x"))
    assert dense["memory_params"] == 0 and mem["memory_params"] == 64 * 32
    assert 0.5 < mem["flops_per_token"] / dense["flops_per_token"] < 1.5
    assert 1.5 < big["flops_per_token"] / dense["flops_per_token"] < 2.5
    for r in (dense, mem, big):
        assert r["steps"] == 3 and 0.0 <= r["accuracy"] <= 1.0 and r["nll"] > 0 and r["step_ms"] > 0
        assert [p["step"] for p in r["curve"]] == [2, 3]
    assert mem["curve"][-1]["rows_read"] > 0 and mem["memory_usage_last_window"]
    out = capsys.readouterr()
    assert "memory+" in out.out and "accuracy" in out.out and "held-out acc" in out.err
    assert (tmp_path / "curves.png").exists() or "plot skipped" in out.out


def test_time_budget_stops_training(tmp_path):
    report = demo.main(TINY + ["--steps", "100000", "--seconds", "0.5", "--models", "dense", "--out", str(tmp_path)])
    assert 1 <= report["models"]["dense"]["steps"] < 100000

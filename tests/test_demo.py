"""A few steps of the demo at tiny sizes: it trains the three models and writes its results,
alone and on two ranks; and its device choice under torchrun."""
import json

import pytest

from memory_ext import demo, demo_seeds, demo_sweep

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
    # stderr is not a terminal here: no bar redraws, a line per evaluation and one at the end
    assert "\r" not in out.err
    assert [line.split()[0] for line in out.err.splitlines()[1:]] == ["dense"] * 3 + ["memory+"] * 3 + ["dense-2x"] * 3
    # The CLI options as given, but for where this machine wrote the results.
    given = vars(demo.parse_args(TINY + ["--out", str(tmp_path)]))
    assert saved["config"] == {k: v for k, v in given.items() if k != "out"} and "out" in given
    assert saved["run"] == {"world": 1, "device": "cpu", "backend": None}
    assert (tmp_path / "curves.png").exists() or "plot skipped" in out.out


def test_time_budget_stops_training(tmp_path):
    report = demo.main(TINY + ["--steps", "100000", "--seconds", "0.5", "--models", "dense", "--out", str(tmp_path)])
    assert 1 <= report["models"]["dense"]["steps"] < 100000


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("memory_parallel", [1, 2])
def test_demo_under_torchrun_with_two_ranks(tmp_path, memory_parallel):
    """torchrun with two ranks: plain data parallel (memory parallel 1, the default) or one
    memory group of 2 (the value table column-sharded); the Memory+ model trains, evaluates
    on every rank, and rank 0 reports.

    Rank 0 starts from the one-process model and sees its batches, so its first loss is
    the one-process first loss, except that the sharded table draws each column from its
    own seed (the same table for any group size) while the one-process table uses one
    normal_ draw: then the two agree only loosely. Equality of whole runs on the same
    global batch is test_two_ranks_match_one_process_on_the_global_batch."""
    import os
    import subprocess
    import sys

    args = TINY + ["--models", "memory+", "--steps", "2", "--eval-every", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "memory_ext.demo", *args, "--device", "cpu", "--memory-parallel", str(memory_parallel),
           "--out", str(tmp_path / "mp")]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = json.loads((tmp_path / "mp" / "results.json").read_text())
    assert saved["run"] == {"world": 2, "device": "cpu", "backend": "gloo"}
    two = saved["models"]["memory+"]
    single = demo.main(args + ["--out", str(tmp_path / "one")])["models"]["memory+"]
    assert two["steps"] == single["steps"] == 2
    assert [p["step"] for p in two["curve"]] == [1, 2]
    first_two, first_single = two["curve"][0]["train_loss"], single["curve"][0]["train_loss"]
    assert abs(first_two - first_single) < (0.05 if memory_parallel > 1 else 1e-5) * first_single


def test_two_ranks_match_one_process_on_the_global_batch():
    """Two Gloo ranks, each on its own batches, against one process on both ranks' batches:
    the mean loss agrees at every step, with plain data parallelism and with the value
    table sharded (cases in dist_demo_job.py)."""
    import dist_demo_job

    from dist_harness import case_names, failures, run_job

    results = run_job(2, dist_demo_job.demo_job, deadline_s=600)
    bad = failures(results, "demo/")
    assert not bad, "\n".join(bad)
    assert case_names(results, "demo/") == {"demo/memory_parallel_1", "demo/memory_parallel_2"}


@pytest.mark.parametrize(
    "requested,world,local_rank,local_world,n_gpus,want",
    [
        ("cpu", 1, 0, 1, 0, ("cpu", None)),
        ("cuda", 1, 0, 1, 1, ("cuda", None)),  # one process keeps what it asked for
        ("cuda:1", 1, 0, 1, 2, ("cuda:1", None)),
        ("cpu", 2, 1, 2, 2, ("cpu", "gloo")),
        ("cuda", 2, 0, 2, 2, ("cuda:0", "nccl")),
        ("cuda", 2, 1, 2, 2, ("cuda:1", "nccl")),
        ("cuda", 4, 1, 2, 2, ("cuda:1", "nccl")),  # two nodes of two GPUs
        ("cuda", 2, 1, 2, 8, ("cuda:1", "nccl")),
        ("cuda", 2, 0, 2, 1, ("cpu", "gloo")),  # one GPU, two ranks: rank 0 too, so all agree
        ("cuda", 2, 1, 2, 1, ("cpu", "gloo")),
        ("cuda", 3, 2, 3, 0, ("cpu", "gloo")),
    ],
)
def test_device_choice(requested, world, local_rank, local_world, n_gpus, want):
    device, backend, note = demo.choose_device(requested, world, local_rank, local_world, n_gpus)
    assert (device, backend) == want
    if device == "cpu" and requested.startswith("cuda"):
        assert note == (f"memory_ext.demo: {local_world} ranks per node but {n_gpus} GPU(s) visible, "
                        "so no GPU for each rank; all ranks run on the CPU with Gloo")
    else:
        assert note is None


def test_device_choice_agrees_over_the_ranks_of_a_node():
    for n_gpus in range(4):
        for local_world in range(1, 5):
            picks = [demo.choose_device("cuda", local_world * 2, r, local_world, n_gpus) for r in range(local_world)]
            assert len({(d.split(":")[0], b) for d, b, _ in picks}) == 1
            assert all(d == "cpu" or int(d.split(":")[1]) < n_gpus for d, _, _ in picks)


def test_seeds_runs_the_demo_per_seed_and_summarises(tmp_path):
    report = demo.main(["seeds", "--seeds", "0,1", "--out", str(tmp_path), *TINY])
    assert [r["seed"] for r in report["seeds"]] == [0, 1]
    for r in report["seeds"]:
        saved = json.loads((tmp_path / f"seed{r['seed']}" / "results.json").read_text())
        assert saved["config"]["seed"] == r["seed"]
        assert r["memory+_accuracy"] == 100 * saved["models"]["memory+"]["accuracy"]
    spread = report["spread"]["memory+_accuracy"]
    assert spread["min"] <= spread["median"] <= spread["max"]
    assert json.loads((tmp_path / "seeds.json").read_text())["table"].count("\n") == 2 + 2 + 3 - 1


def test_seeds_reuse_reads_runs_made_apart_and_refuses_other_options(tmp_path, monkeypatch):
    # Seed 1 run on its own, as a separate process would; --reuse reads it and runs seed 0.
    alone = demo.main(TINY + ["--seed", "1", "--out", str(tmp_path / "seed1")])
    ran = []
    real_main = demo.main
    monkeypatch.setattr(demo, "main", lambda argv: ran.append(argv) or real_main(argv))
    report = demo_seeds.main(["--seeds", "0,1", "--out", str(tmp_path), "--reuse", *TINY])
    assert len(ran) == 1 and "0" in ran[0]
    assert report["seeds"][1]["memory+_accuracy"] == 100 * alone["models"]["memory+"]["accuracy"]
    with pytest.raises(SystemExit, match="steps differ"):
        demo_seeds.main(["--seeds", "1", "--out", str(tmp_path), "--reuse", *TINY[:1], "4", *TINY[2:]])


def test_sweep_trains_every_size_against_the_dense_models(tmp_path):
    # The sweep's own --n-keys and --entities replace the demo's.
    tiny = [a for i, a in enumerate(TINY) if a not in ("--n-keys", "--entities") and TINY[i - 1] not in ("--n-keys", "--entities")]
    report = demo.main(["sweep", "--n-keys", "4,8", "--seeds", "0", "--entities", "12", "--out", str(tmp_path), *tiny])
    models = sorted((p["model"], p["n_keys"]) for p in report["points"])
    assert models == [("dense", None), ("dense-2x", None), ("memory+", 4), ("memory+", 8)]
    sizes = report["memory_plus_by_size"]
    assert [r["memory_params"] for r in sizes] == [16 * 32, 64 * 32]
    assert (tmp_path / "sweep.json").exists() and (tmp_path / "sweep.png").stat().st_size > 0
    assert report["machine"]["cpu"] and "commit" in report["machine"] and "out" not in report["options"]


def test_sweep_merges_sizes_run_apart_and_refuses_unlike_runs(tmp_path):
    tiny = [a for i, a in enumerate(TINY) if a not in ("--n-keys", "--entities") and TINY[i - 1] not in ("--n-keys", "--entities")]
    sweep = ["sweep", "--seeds", "0", "--entities", "12"]
    demo.main(sweep + ["--n-keys", "4", "--out", str(tmp_path / "first"), *tiny])
    added = demo.main(sweep + ["--n-keys", "8", "--no-dense", "--out", str(tmp_path / "added"), *tiny])
    assert [(p["model"], p["n_keys"]) for p in added["points"]] == [("memory+", 8)]
    first, second = str(tmp_path / "first" / "sweep.json"), str(tmp_path / "added" / "sweep.json")
    merged = demo.main(["sweep", "--merge", first, second, "--out", str(tmp_path / "merged")])
    assert sorted((p["model"], p["n_keys"]) for p in merged["points"]) == [("dense", None), ("dense-2x", None),
                                                                          ("memory+", 4), ("memory+", 8)]
    assert [r["n_keys"] for r in merged["memory_plus_by_size"]] == [4, 8]
    assert [s["file"] for s in merged["merged_from"]] == ["sweep.json", "sweep.json"]
    assert (tmp_path / "merged" / "sweep.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="more than one file"):
        demo.main(["sweep", "--merge", first, first, "--out", str(tmp_path / "twice")])
    # A merged file merges again: its runs are listed as they were.
    demo.main(["sweep", "--merge", first, "--out", str(tmp_path / "m1")])
    again = demo.main(["sweep", "--merge", str(tmp_path / "m1" / "sweep.json"), second, "--out", str(tmp_path / "again")])
    assert again["points"] == merged["points"] and again["merged_from"] == merged["merged_from"]
    other = [a if TINY[i - 1] != "--steps" else "4" for i, a in enumerate(tiny)]
    demo.main(sweep + ["--n-keys", "16", "--no-dense", "--out", str(tmp_path / "other"), *other])
    with pytest.raises(SystemExit, match="demo options"):
        demo.main(["sweep", "--merge", first, str(tmp_path / "other" / "sweep.json"), "--out", str(tmp_path / "m2")])


def test_sweep_merge_names_bad_files_and_ignored_options(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"points": []}))
    for name, message in (("missing.json", "cannot read .*missing.json"), ("broken.json", "broken.json is not JSON"),
                          ("other.json", "other.json is not a sweep.json: it has no demo_options, options, machine")):
        with pytest.raises(SystemExit, match=message):
            demo.main(["sweep", "--merge", str(tmp_path / name), "--out", str(tmp_path / "out")])
    for option in (["--n-keys", "8"], ["--seeds=3"], ["--no-dense"], ["--entities", "5"]):
        with pytest.raises(SystemExit, match=f"{option[0].split('=')[0]} would have no effect"):
            demo_sweep.parse_args(["--merge", "a.json", *option])


def test_sweep_trains_2000_steps_unless_told():
    assert demo_sweep.parse_args(["--seeds", "0"])[1] == ["--steps", "2000"]
    assert demo_sweep.parse_args(["--seconds", "5"])[1] == ["--seconds", "5"]
    assert demo_sweep.parse_args(["--steps=7"])[1] == ["--steps=7"]

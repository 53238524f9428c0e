"""bench/cpp_tables.py, which writes README's C++ table from the C++ benchmarks' JSON
(Google Benchmark's format): repetitions reduce to median, min and max; memory_ext's rows
get their ratio to the peer of the same case only; the Python numbers of the same case go
next to the C++ ones."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import cpp_tables  # noqa: E402


def gbench_file(path, runs: dict[str, list[float]]) -> None:
    """A Google Benchmark JSON file: each case's repetitions (ms) and their aggregates."""
    benchmarks = []
    for name, times in runs.items():
        run_name = f"{name}/real_time"
        for i, t in enumerate(times):
            benchmarks.append(dict(name=run_name, run_name=run_name, run_type="iteration", repetitions=len(times),
                                   repetition_index=i, real_time=t, time_unit="ms", bytes_per_second=1e9 / t))
        ordered = sorted(times)
        for stat, value in (("mean", sum(times) / len(times)), ("median", ordered[len(times) // 2]),
                            ("min", ordered[0]), ("max", ordered[-1])):
            benchmarks.append(dict(name=f"{run_name}_{stat}", run_name=run_name, run_type="aggregate",
                                   aggregate_name=stat, repetitions=len(times), real_time=value, time_unit="ms",
                                   bytes_per_second=1e9 / value, pct_copy=100 * (1e9 / value) / 40e9))
    context = dict(cpu="Test CPU", threads="2", commit="abc1234", copy_gbs="40.0")
    path.write_text(json.dumps(dict(context=context, benchmarks=benchmarks)))


def test_median_min_max_and_like_for_like_ratio(tmp_path):
    f = tmp_path / "eb.json"
    gbench_file(f, {
        "memory_ext/forward/float32/dim:512/tokens:4096": [10.0, 12.0, 11.0],
        "torch/forward/float32/dim:512/tokens:4096": [30.0, 33.0, 36.0],
        "torch/forward/float32/dim:512/tokens:1024": [5.0, 5.0, 5.0],  # another shape: never compared
        "memory_ext/backward_sparse/float32/dim:512/tokens:4096": [8.0, 8.0, 8.0],  # no peer in the file
    })
    rows, context = cpp_tables.load_cpp([str(f)])
    cpp_tables.add_peer_ratios(rows)
    by = {(r["impl"], r["op"], r["tokens"]): r for r in rows}
    ours = by[("memory_ext", "forward", 4096)]
    assert (ours["median_ms"], ours["min_ms"], ours["max_ms"]) == (11.0, 10.0, 12.0)
    assert ours["dim"] == 512 and ours["dtype"] == "float32"
    assert abs(ours["x_peer"] - 33.0 / 11.0) < 1e-12 and ours["peer"] == "torch"
    assert "x_peer" not in by[("memory_ext", "backward_sparse", 4096)]
    table = cpp_tables.cpp_table(rows, context)
    assert "Test CPU" in table and "3.00x vs torch" in table and "11 (10-12)" in table


def test_python_numbers_next_to_the_same_case(tmp_path):
    f = tmp_path / "eb.json"
    gbench_file(f, {"memory_ext/forward/bfloat16/dim:512/tokens:4096": [10.0, 10.0, 10.0],
                    "memory_ext/forward/float32/dim:512/tokens:4096": [20.0, 20.0, 20.0]})
    py = tmp_path / "py.json"
    py.write_text(json.dumps(dict(benchmark="embedding_bag", results=[
        dict(impl="memory_ext", op="forward", dtype="bfloat16", dim=512, tokens=4096, bag=128, ms=10.5),
        dict(impl="memory_ext", op="forward", dtype="bfloat16", dim=512, tokens=1024, bag=128, ms=3.0)])))
    rows, _ = cpp_tables.load_cpp([str(f)])
    table = cpp_tables.side_by_side(rows, cpp_tables.python_rows([str(py)]))
    lines = [ln for ln in table.splitlines() if ln.startswith("| forward")]
    assert len(lines) == 1, table  # float32 has no Python number; tokens 1024 no C++ one
    assert "bfloat16" in lines[0] and "+0.5 ms (+5%)" in lines[0]

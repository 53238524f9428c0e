"""bench/json_table.py, which prints README's tables from a Python benchmark's JSON: the
chosen columns in order, filters, three significant digits, "-" for a missing value."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import json_table  # noqa: E402

PAYLOAD = dict(machine=dict(cpu="Test CPU", threads=2, torch="2.x", commit="abc1234"), copy_gbs=27.44,
               results=[dict(impl="memory_ext", dtype="float32", ms=47.123, x_torch=1.2871),
                        dict(impl="torch", dtype="float32", ms=60.8),
                        dict(impl="memory_ext", dtype="bfloat16", ms=1406.4, x_torch=1.42)])


def test_columns_filters_and_formatting(tmp_path, capsys):
    f = tmp_path / "bench.json"
    f.write_text(json.dumps(PAYLOAD))
    json_table.main([str(f), "--columns", "impl", "ms", "x_torch", "--where", "dtype=float32"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Test CPU, 2 threads, copy 27.4 GB/s, torch 2.x, commit abc1234"
    assert out[2:] == ["| impl | ms | x_torch |", "|---|---|---|", "| memory_ext | 47.1 | 1.29 |", "| torch | 60.8 | - |"]


def test_large_values_keep_every_digit():
    assert json_table.table(PAYLOAD, ["ms"], ["dtype=bfloat16"]).splitlines()[-1] == "| 1406 |"

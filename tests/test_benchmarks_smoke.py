"""Each Python benchmark runs end to end on a tiny shape (--quick) and writes its JSON:
a smoke run, not a timing, so that a broken benchmark fails here rather than on a
borrowed GPU."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["embedding_bag", "pk_topk", "value_update"])
def test_benchmark_quick_run_writes_complete_json(name, tmp_path):
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", f"bench_{name}.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report.get("complete") is True, report.keys()
    assert report["machine"]["commit"], report["machine"]
    assert report["results"], report

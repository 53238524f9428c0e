"""bench/gpu_check.sh, the one-call GPU check, checked on the CPU: its plan fits the
budget of a borrowed GPU and a run returns at most a handful of files."""
import os
import re
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
MAX_FILES_RETURNED = 8  # what the GPU machine sends back at most
MAX_TOTAL_CAP_S = 480


def _run(*args, **kwargs):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=120, **kwargs)


def _plan_rows():
    out = _run("--plan")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:] if line and not line.startswith("total")]
    return out.stdout, [(r[0], r[1]) for r in rows]


def test_plan_fits_the_budget_in_value_order():
    text, rows = _plan_rows()
    names = [name for name, _ in rows]
    fixed = sum(int(cap) for _, cap in rows if cap != "rest")
    assert fixed <= MAX_TOTAL_CAP_S, text
    assert f"total of the fixed caps: {fixed} s" in text
    # Build before the tests, correctness before the sanitizer, both before any benchmark.
    order = ["build", "tests_cuda", "memcheck", "racecheck"]
    assert [names.index(n) for n in order] == sorted(names.index(n) for n in order), names
    first_bench = min(i for i, n in enumerate(names) if "bench" in n)
    assert names.index("racecheck") < first_bench
    # Only the last step may take "the rest" of the budget.
    assert [cap for _, cap in rows].count("rest") <= 1 and rows[-1][1] == "rest" or "rest" not in text


def test_every_cuda_test_module_is_selected():
    # The GPU step selects cases by "cuda" in their ids: every module with CUDA cases
    # must have some, and the CPU emulations (run by CI) must be left out.
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "tests", "-k", "cuda and not emulation", "--collect-only", "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    selected = {line.split("::")[0] for line in out.stdout.splitlines() if "::" in line}
    cuda_modules = {f"tests/{f}" for f in os.listdir(os.path.join(ROOT, "tests")) if re.match(r"test_.*cuda.*\.py$", f)}
    cuda_modules -= {m for m in cuda_modules if "emulation" in m}
    assert cuda_modules <= selected, (cuda_modules - selected, out.stdout[-2000:])
    assert not any("emulation" in line for line in out.stdout.splitlines() if "::" in line)


def test_dry_run_returns_few_files_with_every_log(tmp_path):
    out_dir = tmp_path / "out"
    out = _run("--dry-run", str(out_dir), env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout + out.stderr
    files = sorted(os.listdir(out_dir))
    assert files == ["gpu_check.tar.gz", "summary.json", "summary.txt"]
    assert len(files) <= MAX_FILES_RETURNED
    _, rows = _plan_rows()
    with tarfile.open(out_dir / "gpu_check.tar.gz") as tar:
        logs = {os.path.basename(n) for n in tar.getnames()}
    for name, _ in rows:
        assert f"{name}.log" in logs, (name, logs)
    summary = (out_dir / "summary.txt").read_text()
    for name, _ in rows:
        assert re.search(rf"^{name}\s+ok", summary, re.M), summary


@pytest.mark.parametrize("args", [[], ["a", "b"]])
def test_usage_error(args):
    out = _run(*args)
    assert out.returncode == 2 and "usage" in out.stderr


def test_case_timeout_fails_one_test_and_goes_on(tmp_path):
    (tmp_path / "test_slow.py").write_text(
        "import time\n\ndef test_slow():\n    time.sleep(30)\n\ndef test_next():\n    pass\n"
    )
    env = {**os.environ, "GPU_CHECK_TEST_TIMEOUT_S": "1", "PYTHONPATH": os.path.join(ROOT, "bench")}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", str(tmp_path), "-p", "pytest_case_timeout", "-p", "no:cacheprovider", "-q"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )
    assert "1 failed, 1 passed" in out.stdout, out.stdout + out.stderr
    assert "exceeded its 1 s limit" in out.stdout

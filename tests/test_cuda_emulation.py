"""The CUDA kernel sources run on the CPU, wherever a C++20 compiler exists.

Each kernel family has an emulation program (tests/<family>_emulate.cpp) that compiles
the kernel headers of csrc/cuda/ unchanged against the one CUDA emulation harness,
tests/cuda_emulate.h (one host thread per CUDA thread), launches them over every launch
shape, dtype and index path, and compares each case bit for bit with an exact reference.
The programs are built with AddressSanitizer, so an out-of-bounds access of a kernel is a
failure too. Only a missing compiler skips; a build that fails (C++20 included) fails.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# family -> (least number of cases that must pass, environments to run the program in)
EMULATIONS = {
    "embedding_bag": (1400, [{}]),
    # async copies retired late (reads of a stage before its wait see poison), then issued
    # early (overwrites of a stage still being read show as wrong results or races)
    "pk_topk": (45, [{"MEMORY_EXT_EMU_EARLY_COPIES": "0"}, {"MEMORY_EXT_EMU_EARLY_COPIES": "1"}]),
    "quantized_embedding_bag": (80, [{}]),
    "row_adagrad": (50, [{}]),
    "row_adam": (120, [{}]),
}


def _cxx() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _has_asan(cxx: str, tmp: str) -> bool:
    """Whether this toolchain builds and runs an AddressSanitizer program at all."""
    src, exe = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe")
    with open(src, "w") as f:
        f.write("int main() { return 0; }\n")
    build = subprocess.run([cxx, "-fsanitize=address", src, "-o", exe], capture_output=True, text=True)
    return build.returncode == 0 and subprocess.run([exe], capture_output=True).returncode == 0


def _build(cxx: str, family: str, exe: str, asan: bool) -> subprocess.CompletedProcess:
    # -fno-strict-aliasing: the kernels reinterpret shared memory, as CUDA allows.
    cmd = [cxx, "-std=c++20", "-O2", "-pthread", "-fno-strict-aliasing",
           "-I", os.path.join(ROOT, "csrc", "include"), "-I", os.path.join(ROOT, "csrc", "cuda"),
           "-I", os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", f"{family}_emulate.cpp"),
           "-o", exe]
    if asan:
        cmd.insert(1, "-fsanitize=address")
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.skipif(_cxx() is None, reason="no C++ compiler to build the kernel emulation")
@pytest.mark.parametrize("family", sorted(EMULATIONS))
def test_kernel_emulation_on_cpu(family):
    """The family's CUDA kernels, emulated on the CPU, equal the exact reference in every
    case, with no out-of-bounds access and no misuse of the CUDA built-ins."""
    min_ok, envs = EMULATIONS[family]
    cxx = _cxx()
    with tempfile.TemporaryDirectory() as tmp:
        asan = _has_asan(cxx, tmp)
        # CI sets MEMORY_EXT_EMU_REQUIRE_ASAN=1: there, losing the bounds checks is a failure.
        assert asan or os.environ.get("MEMORY_EXT_EMU_REQUIRE_ASAN") != "1", (
            f"{cxx} cannot build AddressSanitizer programs and MEMORY_EXT_EMU_REQUIRE_ASAN=1")
        if not asan:
            warnings.warn(f"{cxx} cannot build AddressSanitizer programs: the {family} "
                          "emulation runs without bounds checks", stacklevel=1)
        exe = os.path.join(tmp, f"{family}_emulate")
        build = _build(cxx, family, exe, asan)
        assert build.returncode == 0, f"building the {family} emulation failed:\n{build.stderr[-4000:]}"
        for env in envs:
            run = subprocess.run([exe], capture_output=True, text=True, timeout=1800,
                                 env={**os.environ, **env})
            out = run.stdout + run.stderr
            assert run.returncode == 0, f"{env}:\n{out[-4000:]}"
            assert "MISMATCH" not in run.stdout, run.stdout[-4000:]
            assert run.stdout.count(": ok") >= min_ok, run.stdout[-2000:]


@pytest.mark.skipif(_cxx() is None, reason="no C++ compiler to build the launch-rule checks")
def test_launch_rules_on_cpu():
    """The launchers' pure decisions (vector width from alignment, rows_to_dense copy unit,
    bad lookups, pk_topk kernel and CTA size) hold on every case of
    tests/launch_rules_test.cpp."""
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "launch_rules_test")
        build = subprocess.run(
            [_cxx(), "-std=c++20", "-O2", "-I", os.path.join(ROOT, "csrc", "include"),
             "-I", os.path.join(ROOT, "csrc", "cuda"), os.path.join(ROOT, "tests", "launch_rules_test.cpp"),
             "-o", exe], capture_output=True, text=True)
        assert build.returncode == 0, build.stderr[-4000:]
        run = subprocess.run([exe], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and "FAILED" not in run.stdout, run.stdout

"""A per-test time limit for the GPU check's pytest runs (no pytest-timeout there).

Loaded with ``-p pytest_case_timeout`` (bench/ on the path). Each test gets
GPU_CHECK_TEST_TIMEOUT_S seconds (default 60): past that, SIGALRM fails it with a
TimeoutError and the run goes on with the next test. A test stuck inside a C call never
sees the signal, so faulthandler also dumps every thread's stack 30 s later and ends the
process: the log then names the test that hung instead of ending silently at the step's cap.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys

import pytest

LIMIT_S = int(os.environ.get("GPU_CHECK_TEST_TIMEOUT_S", "60"))


def _expired(signum, frame):
    raise TimeoutError(f"test exceeded its {LIMIT_S} s limit (GPU_CHECK_TEST_TIMEOUT_S)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    previous = signal.signal(signal.SIGALRM, _expired)
    signal.alarm(LIMIT_S)
    faulthandler.dump_traceback_later(LIMIT_S + 30, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

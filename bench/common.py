"""Shared benchmark plumbing: timing, the machine's copy bandwidth, and result files.

Every benchmark reports bandwidth next to the copy bandwidth measured in the same run (the
ceiling) and saves JSON with the machine, device, versions and commit.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import time
from collections.abc import Callable

import torch

from memory_ext.ops import advise_huge_pages
from memory_ext.provenance import machine_info, recorded_options  # noqa: F401  (re-exported for the benchmarks)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_samples_ms(fn: Callable[[], object], device: str, *, warmup: int = 2, iters: int = 7,
                    before_each: Callable[[], object] | None = None) -> list[float]:
    """Wall time of each of iters calls of fn in ms, after warmup calls (CUDA: events around
    each call on the current stream). before_each, when given, runs untimed just before each
    timed call (a CopyProbe, to pair every call with a copy measured the moment before)."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(iters):
        if before_each is not None:
            before_each()
            sync(device)
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def time_ms(fn: Callable[[], object], device: str, *, warmup: int = 2, iters: int = 7) -> float:
    """Median wall time of fn in ms (see time_samples_ms)."""
    return statistics.median(time_samples_ms(fn, device, warmup=warmup, iters=iters))


def spread_ms(samples: list[float]) -> dict:
    """min_ms, median_ms, max_ms of timing samples."""
    return {"min_ms": min(samples), "median_ms": statistics.median(samples), "max_ms": max(samples)}


def table_storage(shape, dtype: torch.dtype, device: str) -> torch.Tensor:
    """An uninitialised tensor laid out as memory_ext's tables and optimizer states are: on
    transparent huge pages where the system has them (asked for before the first touch)."""
    return advise_huge_pages(torch.empty(shape, dtype=dtype, device=device))


def on_table_storage(t: torch.Tensor) -> torch.Tensor:
    """A copy of t laid out as table_storage: both sides of a comparison read the same."""
    return table_storage(t.shape, t.dtype, str(t.device)).copy_(t)


def copy_bandwidth_gbs(device: str, nbytes: int = 1 << 30) -> float:
    """Large tensor copy, counted as bytes read + bytes written per second (GB/s), on huge
    pages as the tables are: the median of 9 timed copies after 2 untimed ones."""
    probe = CopyProbe(device, nbytes)
    for _ in range(2):
        probe()
    probe.take()
    for _ in range(9):
        probe()
    return statistics.median(probe.take())


class CopyProbe:
    """A copy of nbytes (on huge pages, as the tables are) timed each time it is called, its
    bandwidth (bytes read + written per second, GB/s) kept in order. Run before each timed
    call of a case (time_samples_ms's before_each), it pairs every call with the copy
    bandwidth of that moment, so that a share of copy compares a call with the machine's
    state when it ran, not with a copy measured minutes before. (Where a kernel is bound by
    latency rather than bandwidth, its share still falls when the machine's copy is fast:
    the pairing removes the drift of the reference, not the kernel's own.)"""

    def __init__(self, device: str, nbytes: int = 1 << 28):
        self.device = device
        self.nbytes = nbytes
        self.src = table_storage(nbytes // 4, torch.float32, device).uniform_()
        self.dst = table_storage(nbytes // 4, torch.float32, device)
        self.dst.copy_(self.src)  # the pages touched before the first timed copy
        self.gbs: list[float] = []

    def __call__(self) -> None:
        ms = time_samples_ms(functools.partial(self.dst.copy_, self.src), self.device, warmup=0, iters=1)[0]
        self.gbs.append(2 * self.nbytes / (ms * 1e-3) / 1e9)

    def take(self) -> list[float]:
        """The bandwidths measured since the last take, and a fresh start."""
        taken, self.gbs = self.gbs, []
        return taken


def after_copies(fn, device: str, iters: int, probe: CopyProbe) -> tuple[list[float], list[float]]:
    """(ms, copy GB/s) of iters calls of fn, each right after a copy measured by probe. The
    copy evicts the caches: these calls give shares of copy (paired_pct_copy), not times."""
    probe.take()  # the pairs start here
    return time_samples_ms(fn, device, warmup=0, iters=iters, before_each=probe), probe.take()


def paired_pct_copy(nbytes: int, samples_ms: list[float], copy_gbs: list[float]) -> float:
    """Median over the pairs of (nbytes / call time) as % of the copy bandwidth measured just
    before that call."""
    return statistics.median(100 * nbytes / (ms * 1e-3) / 1e9 / gbs
                             for ms, gbs in zip(samples_ms, copy_gbs, strict=True))


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(format_value(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(format_value(r.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True)))


def format_value(v) -> str:
    """A table cell: floats to three significant digits, None as "-"."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def save_json(path: str, payload: dict, *, quiet: bool = False) -> None:
    """Writes payload to path (through a temporary file: a run killed while writing
    leaves the previous complete file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
    if not quiet:
        print(f"results written to {path}")


def save_complete(path: str, payload: dict, columns: list[str]) -> None:
    """The end of a run whose cases were saved as they finished: every case in one table,
    and the JSON written with "complete": true."""
    payload["complete"] = True
    print("\nall cases:")
    print_table(payload["results"], columns)
    save_json(path, payload)

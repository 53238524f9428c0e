"""Runs a job function on N local processes joined by a Gloo process group, with a deadline.

Each rank records named case results ("ok" or a traceback) into a dict that comes back
to the test as JSON, so one spawned job can serve many tests and a failing case is
reported with its traceback instead of killing the job. A job that outlives its deadline
is killed and reported, never left hanging.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GROUP_TIMEOUT = timedelta(seconds=120)


@contextmanager
def case(results: dict, name: str):
    """Record the block's outcome under ``name``: "ok" or its traceback."""
    try:
        yield
    except Exception:  # noqa: BLE001 - the traceback is the test's report
        results[name] = traceback.format_exc()
    else:
        results[name] = "ok"


def _worker(rank: int, world: int, store_path: str, out_dir: str, backend: str, fn, args) -> None:
    torch.set_num_threads(1)  # several ranks share two cores
    results: dict = {}
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, init_method=f"file://{store_path}", rank=rank, world_size=world, timeout=GROUP_TIMEOUT
        )
        fn(rank, world, results, *args)
    except Exception:  # noqa: BLE001
        results["__job__"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    # Skip destroy_process_group: a case may leave a subgroup with an abandoned
    # collective (the timeout case), and the process exits right after anyway.
    os._exit(0)


def run_job(world: int, fn, *args, deadline_s: float = 300.0, backend: str = "gloo") -> list[dict]:
    """Run fn(rank, world, results, *args) on ``world`` processes; per-rank result dicts."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="memdist_") as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(r, world, store, tmp, backend, fn, args), daemon=True)
            for r in range(world)
        ]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline_s
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        late = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        out = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.json")
            res = json.load(open(path)) if os.path.exists(path) else {}
            if r in late:
                res["__job__"] = f"rank {r} still running after {deadline_s} s, killed"
            elif not os.path.exists(path):
                res["__job__"] = f"rank {r} exited with code {procs[r].exitcode} and no results"
            out.append(res)
        return out


def failures(results: list[dict], prefix: str) -> list[str]:
    """Readable failures of the cases named ``prefix...`` (and of the job itself) over all ranks."""
    bad = []
    for rank, res in enumerate(results):
        for name, outcome in res.items():
            if (name.startswith(prefix) or name == "__job__") and outcome != "ok":
                bad.append(f"rank {rank} {name}:\n{outcome}")
    return bad


def case_names(results: list[dict], prefix: str) -> set[str]:
    """Names of the cases reported by every rank under ``prefix``."""
    sets = [{n for n in res if n.startswith(prefix)} for res in results]
    return set.intersection(*sets) if sets else set()

"""Product-key top-k: memory_ext's pk_topk vs the usual path (two matmuls into full score
tensors, three torch.topk, a gather), with the peak extra memory of each.

    python bench/bench_pk_topk.py [--device cpu|cuda] [--quick] [--out bench/out/pk_topk.json]

Peak extra memory: on CUDA the caching allocator's peak above the inputs; on the CPU the
growth of the resident set of a fresh process over one call, with malloc told never to
return memory to the system (so the growth is the call's peak footprint). Each case is timed
over --iters calls after a warm-up: ms is the median, min_ms and max_ms the extremes. The
JSON file is rewritten after every case.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import multiprocessing as mp
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, print_table, recorded_options, save_json, spread_ms, time_samples_ms  # noqa: E402

import memory_ext  # noqa: E402
from memory_ext.reference import pk_topk_reference_path  # noqa: E402
from memory_ext.testing import sample_inputs  # noqa: E402

IMPLS = {
    "memory_ext": lambda q, k, top: memory_ext.pk_topk(q, k, top),
    "reference": pk_topk_reference_path,
}


def make_inputs(tokens, heads, n_keys, half, dtype, device):
    """query, keys drawn on device (the same on every call)."""
    s = sample_inputs("pk_topk", device, dtype, tokens=tokens, heads=heads, n_keys=n_keys, half=half)
    return s["query"], s["keys"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_peak_child(impl, shape, k, dtype_name, threads, queue):
    # Keep every block the call frees inside the process (no mmap'd chunks, no trimming), so the
    # resident set can only grow: its growth over the call is the call's peak footprint. Free
    # blocks that are resident before the call would hide what the call reuses of them: the
    # inputs are made before the settings (their temporaries go back to the system), and what
    # the warm-up call freed is handed back (malloc_trim) before the base is read.
    libc = ctypes.CDLL("libc.so.6")
    torch.set_num_threads(threads)
    query, keys = make_inputs(*shape, getattr(torch, dtype_name), "cpu")
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**30)
    IMPLS[impl](query[:1], keys, k)  # first call loads what it needs; tiny outputs
    libc.malloc_trim(0)
    base = _rss_bytes()
    IMPLS[impl](query, keys, k)
    queue.put(max(0, _rss_bytes() - base))


def peak_extra_bytes(impl, query, keys, k, shape, dtype_name, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        IMPLS[impl](query, keys, k)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cpu_peak_child, args=(impl, shape, k, dtype_name, torch.get_num_threads(), queue))
    proc.start()
    proc.join()
    return queue.get() if proc.exitcode == 0 else None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--n-keys", type=int, default=1024)
    p.add_argument("--half", type=int, default=None)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--dtypes", nargs="+", default=None)
    p.add_argument("--iters", type=int, default=None, help="timed calls per measurement (default 5; --quick: 3)")
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke run of a few seconds")
    p.add_argument("--out", default="bench/out/pk_topk.json")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.tokens, args.half = args.tokens or 256, args.half or 32
        args.n_keys = min(args.n_keys, 128)
    args.iters = args.iters or (3 if args.quick else 5)
    tokens = args.tokens or (65536 if cuda else 4096)
    half = args.half or (256 if cuda else 128)
    dtypes = args.dtypes or (["bfloat16"] if cuda else ["float32", "bfloat16"])
    info = machine_info(args.device)
    print(f"device {args.device} ({info.get('gpu', info['cpu'])}), threads {info['threads']}")

    rows = []
    payload = dict(benchmark="pk_topk", machine=info, config=recorded_options(args), complete=False, results=rows)
    for dtype_name in dtypes:
        shape = (tokens, args.heads, args.n_keys, half)
        query, keys = make_inputs(*shape, getattr(torch, dtype_name), args.device)
        case = dict(dtype=dtype_name, tokens=tokens, heads=args.heads, n_keys=args.n_keys, half=half, k=args.k)
        # Same answers first: an honest comparison needs equal scores.
        s_ours, _ = IMPLS["memory_ext"](query, keys, args.k)
        s_ref, _ = IMPLS["reference"](query, keys, args.k)
        max_diff = (s_ours.float() - s_ref.float()).abs().max().item()
        flops = 2 * 2 * tokens * args.heads * args.n_keys * half
        for impl, fn in IMPLS.items():
            samples = time_samples_ms(functools.partial(fn, query, keys, args.k), args.device, warmup=1,
                                      iters=args.iters)
            spread = spread_ms(samples)
            ms = spread["median_ms"]
            peak = peak_extra_bytes(impl, query, keys, args.k, shape, dtype_name, args.device)
            rows.append(dict(impl=impl, **case, min_ms=spread["min_ms"], ms=ms, max_ms=spread["max_ms"],
                             tokens_per_s=tokens / (ms * 1e-3),
                             score_gflops=flops / (ms * 1e-3) / 1e9,
                             peak_extra_mb=peak / 2**20 if peak is not None else None,
                             max_score_diff=max_diff))
        ours, ref = rows[-2], rows[-1]
        ours["x_reference"] = ref["ms"] / ours["ms"]
        if ours["peak_extra_mb"] and ref["peak_extra_mb"]:
            ours["memory_vs_reference"] = ours["peak_extra_mb"] / ref["peak_extra_mb"]
        save_json(args.out, payload, quiet=True)
        del query, keys, s_ours, s_ref
    payload["complete"] = True
    print_table(rows, ["impl", "dtype", "tokens", "half", "min_ms", "ms", "max_ms", "tokens_per_s", "score_gflops",
                       "peak_extra_mb", "x_reference", "memory_vs_reference", "max_score_diff"])
    save_json(args.out, payload)


if __name__ == "__main__":
    main()

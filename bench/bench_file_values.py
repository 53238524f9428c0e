"""Value tables opened memory-mapped from a safetensors file: lookups with the file's pages
cold and warm, against the same table read into memory.

The table (default 2^22 rows x dim 512 float32: 8 GiB) is written once, chunk by chunk, to a
fresh file in --dir (default: the temporary directory), which is deleted at the end, also
when the run fails. Cases, each a weighted bag (memory_ext.ops.embedding_bag) of tokens x bag
lookups at uniform random rows (default 4096 x 128: the bench_embedding_bag and
bench_quantized shape, and a ProductKeyMemory's default 4 heads x top-32 per token):

- file cold: each repeat drops the file's pages from the page cache (posix_fadvise
  POSIX_FADV_DONTNEED once no mapping of it is alive), opens it with load_values(mmap=True)
  and times one lookup at freshly drawn rows: every row read is a page fault that reads the
  disk;
- file warm: the same mapping, one fixed lookup repeated after a warm-up call, so every page
  it reads is resident;
- in memory: the table read with load_values(mmap=False) (anonymous memory on huge pages),
  the same fixed lookup; skipped, with the reason in the JSON, when the table does not fit
  in the memory available with a margin (or with --no-in-memory).

Bytes per lookup = rows read (tokens * bag * dim * elem) + indices (8 B) and weights (4 B)
per row read + the output written; GB/s is shown next to the copy bandwidth measured in the
same run, and rows/s counts rows read. open_ms is the time to open: load_values(mmap=True)
(the header only) for the file, load_values(mmap=False) from a cold page cache (the whole
file) for the in-memory table. Where mincore is available, the share of the file's pages
still cached after the eviction (cached_pct) and the MB of its pages a cold lookup brought
in (read_mb) are measured too. bitwise_equal: the fixed lookup on the mapped table equals
the in-memory one bitwise (without the in-memory table: the same bag over a copy of just
the rows it reads, re-indexed, which is the same sum in the same order).

    python bench/bench_file_values.py [--quick] [--rows 4194304] [--dim 512] [--dtype float32]
        [--tokens 4096] [--bag 128] [--repeats 5] [--threads N] [--dir DIR]
        [--out bench/out/file_values.json]

The JSON file is rewritten after every case ("complete": false until the last).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    copy_bandwidth_gbs,
    machine_info,
    print_table,
    recorded_options,
    save_json,
    spread_ms,
    time_samples_ms,
)

from memory_ext import ops  # noqa: E402
from memory_ext.nn import load_values, write_values_file  # noqa: E402

COLUMNS = ["table", "median_ms", "min_ms", "max_ms", "gbs", "pct_copy", "rows_per_s", "open_ms", "cached_pct", "read_mb"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHUNK_BYTES = 64 << 20  # rows generated and written per chunk: the table is never held in RAM
PAGE = mmap.PAGESIZE
EVICTION = "posix_fadvise(POSIX_FADV_DONTNEED) on the whole file, with no mapping of it alive"
# Writing 1 to /proc/sys/vm/drop_caches would empty the page cache of the whole machine (every
# other process then rereads its files) and needs root; dropping this file's pages is enough.
DROP_CACHES = "not used: it is system-wide and needs root; only this file's pages need dropping"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=None, help="table rows (default 2^22; --quick: 2^14)")
    p.add_argument("--dim", type=int, default=None, help="default 512 (--quick: 64)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--tokens", type=int, default=None, help="bags per lookup (default 4096; --quick: 256)")
    p.add_argument("--bag", type=int, default=None, help="rows per bag (default 128; --quick: 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed lookups per case (default 5; --quick: 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--dir", default=None, help="where the table file is written (default: the temporary directory)")
    p.add_argument("--no-in-memory", action="store_true", help="skip the in-memory table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a table of a few MB: a smoke run of a few seconds")
    p.add_argument("--out", default="bench/out/file_values.json")
    args = p.parse_args(argv)
    q = args.quick
    args.rows = args.rows or (1 << 14 if q else 1 << 22)
    args.dim = args.dim or (64 if q else 512)
    args.tokens = args.tokens or (256 if q else 4096)
    args.bag = args.bag or (16 if q else 128)
    args.repeats = args.repeats or (2 if q else 5)
    args.dir = args.dir or tempfile.gettempdir()
    if min(args.rows, args.dim, args.tokens, args.bag, args.repeats) <= 0:
        p.error("--rows, --dim, --tokens, --bag and --repeats must be positive")
    return args


# ---------------------------------------------------------------------------------------
# The file and its pages.


def check_disk(directory: str, nbytes: int) -> None:
    """Fail before writing anything when the file system cannot hold the table."""
    need = nbytes + (256 << 20)  # the header page, and room for the file system's own blocks
    free = shutil.disk_usage(directory).free
    if free < need:
        raise SystemExit(f"bench_file_values: {directory} has {free / 2**30:.2f} GiB free, the table file needs "
                         f"{need / 2**30:.2f} GiB; pass --dir on a larger file system, or fewer --rows")


def filesystem(directory: str) -> str | None:
    """The type of the file system holding directory (Linux: from /proc/mounts): tmpfs keeps
    its files in the page cache, where no eviction can make them cold."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[1:3] for line in f]
    except OSError:
        return None
    real = os.path.realpath(directory)
    best = max((m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else None


def write_table(path: str, rows: int, dim: int, dtype: torch.dtype, seed: int) -> float:
    """Write random normal rows, one chunk at a time, to disk; returns seconds."""
    g = torch.Generator().manual_seed(seed)
    step = max(1, CHUNK_BYTES // (dim * 4))
    chunks = (torch.randn(min(step, rows - s), dim, generator=g).to(dtype) for s in range(0, rows, step))
    t0 = time.perf_counter()
    # write_values_file fsyncs the file: its pages are clean, so POSIX_FADV_DONTNEED drops them.
    write_values_file(path, rows, dim, dtype, chunks)
    return time.perf_counter() - t0


def evict(path: str) -> bool:
    """Drop the file's clean pages from the page cache; False where the system offers no way.
    Pages that a live mapping has mapped stay: drop every mapping of the file first."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return libc if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):
        return None


LIBC = _libc()


def cached_pages(path: str) -> int | None:
    """How many of the file's pages the page cache holds (mincore on a read-only shared mapping,
    which maps nothing in and is gone before the lookups); None where mincore is unavailable."""
    if LIBC is None:
        return None
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        return None
    try:
        vec = (ctypes.c_ubyte * ((size + PAGE - 1) // PAGE))()
        if LIBC.mincore(addr, size, vec) != 0:
            return None
        return int(torch.frombuffer(vec, dtype=torch.uint8).bitwise_and(1).sum())
    finally:
        LIBC.munmap(addr, size)


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None off Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def open_table(path: str, *, mapped: bool) -> tuple[torch.Tensor, float]:
    """The file's table (detached: no autograd graph keeps the mapping alive) and the ms it took to open."""
    t0 = time.perf_counter()
    table = load_values(path, mmap=mapped).weight.detach()
    return table, (time.perf_counter() - t0) * 1e3


# ---------------------------------------------------------------------------------------
# The cases.


def make_row(name: str, samples: list[float], nbytes: int, lookups: int, copy: float, **extra) -> dict:
    spread = spread_ms(samples)
    gbs = nbytes / spread["median_ms"] / 1e6
    return dict(table=name, **spread, gbs=gbs, pct_copy=100 * gbs / copy,
                rows_per_s=lookups / (spread["median_ms"] * 1e-3), bytes=nbytes, samples_ms=samples, **extra)


def run(args, path: str, copy: float, payload: dict) -> None:
    dtype = DTYPES[args.dtype]
    nbytes_table = args.rows * args.dim * dtype.itemsize
    lookups = args.tokens * args.bag
    nbytes = lookups * (args.dim * dtype.itemsize + 8 + 4) + args.tokens * args.dim * dtype.itemsize
    results = payload["results"]

    seconds = write_table(path, args.rows, args.dim, dtype, args.seed)
    payload["table_file"] = dict(bytes=os.path.getsize(path), filesystem=filesystem(args.dir), write_s=seconds)
    print(f"wrote {nbytes_table / 2**30:.3g} GiB to {path} ({payload['table_file']['filesystem'] or '?'}) "
          f"in {seconds:.1f} s")

    g = torch.Generator().manual_seed(args.seed + 1)

    def draw():
        return (torch.randint(0, args.rows, (args.tokens, args.bag), generator=g),
                torch.rand(args.tokens, args.bag, generator=g))

    fixed = draw()  # the warm and in-memory lookup, and the bitwise comparison
    # Start the thread pool and the output buffers on a small table, so that the first cold
    # lookup times page faults, not the op's first call.
    small = torch.randn(16, args.dim).to(dtype)
    for _ in range(2):
        ops.embedding_bag(small, fixed[0] % 16, fixed[1])

    # file cold: a fresh mapping per repeat (the previous one dropped, so that its mapped pages
    # can leave the cache), fresh rows, one lookup.
    table = None
    cold_ms, open_ms, cached, read = [], [], [], []
    evicted = False
    for _ in range(args.repeats):
        table = None
        gc.collect()
        evicted = evict(path)
        before = cached_pages(path)
        indices, weights = draw()
        table, ms = open_table(path, mapped=True)
        open_ms.append(ms)
        t0 = time.perf_counter()
        ops.embedding_bag(table, indices, weights)
        cold_ms.append((time.perf_counter() - t0) * 1e3)
        after = cached_pages(path)
        if before is not None and after is not None:
            cached.append(100 * before / -(-os.path.getsize(path) // PAGE))
            read.append((after - before) * PAGE / 1e6)
    cold_effective = None if not cached else max(cached) < 1.0
    payload["eviction"] = dict(method=EVICTION if evicted else "none: posix_fadvise is not available here",
                               drop_caches=DROP_CACHES, residency_probe="mincore" if cached else None,
                               cold_effective=cold_effective)
    if cold_effective is False or not evicted:
        print(f"warning: the file's pages stayed cached after the eviction (up to {max(cached, default=100):.0f}%): "
              "the 'file cold' row is not cold (tmpfs? pass --dir on a disk)")
    results.append(make_row("file cold", cold_ms, nbytes, lookups, copy, open_ms=spread_ms(open_ms)["median_ms"],
                            cached_pct=max(cached) if cached else None,
                            read_mb=statistics.median(read) if read else None))
    save_json(args.out, payload, quiet=True)

    # file warm: the last cold mapping; the warm-up call makes the fixed lookup's pages resident.
    def mapped_lookup():
        return ops.embedding_bag(table, *fixed)

    warm_ms = time_samples_ms(mapped_lookup, "cpu", warmup=1, iters=args.repeats)
    mapped_out = mapped_lookup()
    results.append(make_row("file warm", warm_ms, nbytes, lookups, copy))
    save_json(args.out, payload, quiet=True)

    available = mem_available()
    margin = max(nbytes_table // 4, 256 << 20)
    reason = ("--no-in-memory" if args.no_in_memory else
              None if available is None or nbytes_table + margin <= available else
              f"the table ({nbytes_table / 2**30:.2f} GiB) + a margin of {margin / 2**30:.2f} GiB does not fit in "
              f"the {available / 2**30:.2f} GiB available")
    if reason is not None:
        # The same bag over a copy of only the rows it reads, re-indexed: each output row is
        # the same products summed in the same order, so equal bitwise to the mapped table's.
        rows, inverse = torch.unique(fixed[0], return_inverse=True)
        reference = ops.embedding_bag(table.index_select(0, rows), inverse, fixed[1])
        payload["bitwise_reference"] = "the lookup on a copy of the rows it reads"
    table = None
    gc.collect()
    if reason is None:
        evict(path)  # open_ms: a full read of the file from disk
        memory, load_ms = open_table(path, mapped=False)

        def memory_lookup():
            return ops.embedding_bag(memory, *fixed)

        mem_ms = time_samples_ms(memory_lookup, "cpu", warmup=1, iters=args.repeats)
        reference = memory_lookup()
        payload["bitwise_reference"] = "the lookup on the in-memory table"
        results.append(make_row("in memory", mem_ms, nbytes, lookups, copy, open_ms=load_ms))
        del memory
    else:
        payload["skipped"].append(dict(table="in memory", reason=reason))
        print(f"in memory skipped: {reason}")
    payload["bitwise_equal"] = bool(torch.equal(mapped_out, reference))


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    nbytes_table = args.rows * args.dim * dtype.itemsize
    os.makedirs(args.dir, exist_ok=True)
    check_disk(args.dir, nbytes_table)
    info = machine_info("cpu")
    print(f"cpu {info['cpu']}, threads {info['threads']}; table {args.rows} x {args.dim} {args.dtype} "
          f"({nbytes_table / 2**30:.3g} GiB), tokens {args.tokens}, bag {args.bag}, repeats {args.repeats}")
    copy = copy_bandwidth_gbs("cpu", nbytes=(1 << 26) if args.quick else (1 << 30))
    print(f"copy bandwidth {copy:.1f} GB/s")
    # The folder is this machine's own; its file system (table_file) is what the numbers depend on.
    config = {k: v for k, v in recorded_options(args).items() if k != "dir"}
    payload = dict(benchmark="file_values", machine=info, config=config, copy_gbs=copy, complete=False,
                   results=[], skipped=[])
    fd, path = tempfile.mkstemp(prefix="bench_file_values-", suffix=".safetensors", dir=args.dir)
    os.close(fd)
    try:
        with torch.no_grad():
            run(args, path, copy, payload)
    finally:
        if os.path.exists(path):
            os.remove(path)
    payload["complete"] = True
    print_table(payload["results"], COLUMNS)
    print(f"bitwise equal to {payload['bitwise_reference']}: {payload['bitwise_equal']}")
    save_json(args.out, payload)
    if not payload["bitwise_equal"]:
        raise SystemExit("bench_file_values: the mapped table's lookup differs from the reference")


if __name__ == "__main__":
    main()

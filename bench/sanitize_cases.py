"""Run every kernel of torch.ops.memory once, at small sizes, for compute-sanitizer.

    compute-sanitizer --tool memcheck python3 bench/sanitize_cases.py [--report memcheck.json]
    compute-sanitizer --tool racecheck python3 bench/sanitize_cases.py
    python3 bench/sanitize_cases.py --device cpu      # dry run of the same cases on the CPU

Inputs come from memory_ext.testing.sample_inputs, drawn on the device. The cases pick
shapes that reach every launch shape of the kernels (sub-warp, warp, block and tiled rows;
vector and scalar loads; runs long enough to be split into segments; tensor-core and plain
top-k paths; uint8 and float8 e4m3 quantized rows into each output dtype) and the
index-check paths (on, off, and a reported bad index). Results are checked only for being
finite: the tests check values. After the ops' cases, extra cases run code paths that are no
op of their own: embedding_bag reading a host table through cuda_host_view (CUDA only).

Every op with a kernel for the device must have cases here. One without is a finding:
printed, recorded in the report, and listed in the last line, but not a failure of this
script, whose exit status is about the cases that ran:
  0  every case ran (the sanitizer's own errors come from its --error-exitcode);
  1  a case raised or a check failed;
  2  the device cannot run (no GPU visible, or no CUDA kernels built).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable

import torch

import memory_ext
from memory_ext import ops
from memory_ext.nn import cuda_host_view, quantize_rows
from memory_ext.testing import cuda_skip_reason, op_args, sample_inputs

# Row widths per dtype reaching each launch shape of the forward and backward kernels:
# 16-byte vectors per row: bf16 8 -> 1, fp32 32 -> 8, bf16 96 -> 12, bf16 256 -> 32,
# bf16 1000 -> 125, bf16 4096 -> 512, bf16 5000 -> 625 (tiled); float64 uses 2-element
# vectors; odd widths (3, 17, 101, 1001) take the scalar path.
BAG_SHAPES = [
    (torch.bfloat16, 8), (torch.float32, 32), (torch.bfloat16, 96), (torch.bfloat16, 256),
    (torch.bfloat16, 1000), (torch.bfloat16, 4096), (torch.bfloat16, 5000), (torch.float64, 24),
    (torch.float64, 3000), (torch.bfloat16, 3), (torch.float32, 17), (torch.float16, 101),
    (torch.float16, 1001),
]

# (dtype, half, n_keys, k) reaching each pk_topk path: tensor cores with 16- and 32-wide
# key tiles (bf16/fp16, half <= 256 and <= 512), odd halves (element-wise loads), k ==
# n_keys, the plain path for bf16 half > 512, float32 and float64.
TOPK_SHAPES = [
    (torch.bfloat16, 16, 16, 4), (torch.bfloat16, 16, 128, 32), (torch.float16, 40, 64, 64),
    (torch.bfloat16, 37, 130, 5), (torch.bfloat16, 320, 200, 16), (torch.bfloat16, 520, 64, 3),
    (torch.float32, 33, 80, 12), (torch.float64, 16, 128, 100),
]

# (codes, dim, out_dtype, index_dtype) reaching each quantized_embedding_bag path. CUDA: a
# warp per 128-column tile, 4 columns a lane, so 1 and 3 (idle lanes), 17 and 1001 (a row's
# scale not 4-byte aligned), 128 (one full tile), 129 (a second tile of one column), 512 (4
# tiles); each codes kind into each output dtype. CPU: 64, 128 and 512 keep a row's sums in
# registers, the other widths read rows side by side.
QUANT_SHAPES = [
    ("uint8", 1, torch.float32, torch.int64), ("uint8", 17, torch.float16, torch.int32),
    ("uint8", 128, torch.bfloat16, torch.int64), ("uint8", 512, torch.float32, torch.int32),
    ("float8_e4m3fn", 3, torch.bfloat16, torch.int32), ("float8_e4m3fn", 64, torch.float32, torch.int64),
    ("float8_e4m3fn", 129, torch.float16, torch.int64), ("float8_e4m3fn", 1001, torch.bfloat16, torch.int32),
]


class CaseError(AssertionError):
    pass


class CaseSkipped(Exception):
    """A case the device cannot run; the message says why."""


def _finite(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CaseError("non-finite output")


def _expect_error(call: Callable[[], object], needle: str, what: str) -> None:
    try:
        call()
    except RuntimeError as e:
        if needle not in str(e):
            raise CaseError(f"{what}: unexpected message: {e}") from e
    else:
        raise CaseError(f"{what} was not reported")


def cases_embedding_bag(device: str) -> int:
    n = 0
    for dtype, dim in BAG_SHAPES:
        s = sample_inputs("embedding_bag", device, dtype, seed=n, tokens=5, bag=33, rows=40, dim=dim,
                          index_dtype=torch.int32, weight_dtype=dtype)
        _finite(ops.embedding_bag(**s))
        n += 1
    _finite(ops.embedding_bag(**sample_inputs("embedding_bag", device, tokens=3, bag=0, rows=40)))  # empty bags
    return n + 1 + _bad_index_paths(device, lambda s: ops.embedding_bag(s["values"], s["indices"], s["weights"]))


def cases_embedding_bag_backward(device: str) -> int:
    n = 0
    for dtype, dim in BAG_SHAPES:
        for need_wg in (True, False):
            # 2400 lookups, 95% on rows 0..2: runs of about 760 positions, split into segments.
            s = sample_inputs("embedding_bag_backward", device, dtype, seed=n, tokens=24, bag=100, rows=40, dim=dim,
                              hot=0.95, need_weights_grad=need_wg)
            _finite(*ops.embedding_bag_backward(**s))
            n += 1
    return n + _bad_index_paths(device, lambda s: ops.embedding_bag_backward(*op_args(s)))


def _over_bag_shapes(device: str, op: str, call: Callable[[dict], object]) -> int:
    """call(sample inputs of op) for each of BAG_SHAPES, with and without a hot row (runs
    longer than a segment); returns the number of cases."""
    n = 0
    for dtype, dim in BAG_SHAPES:
        for hot in (0.0, 0.95):
            call(sample_inputs(op, device, dtype, seed=n, tokens=24, bag=100, rows=40, dim=dim, hot=hot))
            n += 1
    return n


def cases_embedding_bag_backward_dense(device: str) -> int:
    n = _over_bag_shapes(device, "embedding_bag_backward_dense",
                         lambda s: _finite(*ops.embedding_bag_backward_dense(**s, check_indices=False)))
    return n + _bad_index_paths(device, lambda s: ops.embedding_bag_backward_dense(*op_args(s)))


def cases_embedding_bag_backward_padded(device: str) -> int:
    def padded(s: dict) -> None:
        s["indices"][::3, ::7] = -1  # padding
        _finite(*ops.embedding_bag_backward_padded(**s))

    n = _over_bag_shapes(device, "embedding_bag_backward_padded", padded)
    # A row count below the capacity (every row read) and one above (most rows unread).
    for rows in (8, 5000):
        s = sample_inputs("embedding_bag_backward_padded", device, seed=n, tokens=24, bag=100, rows=rows, dim=32)
        _finite(*ops.embedding_bag_backward_padded(**s))
        n += 1
    s = sample_inputs("embedding_bag_backward_padded", device, tokens=4, bag=6, rows=20, dim=32)
    s["indices"][1, 2] = 20
    if device == "cpu":  # the CUDA kernel skips it (reporting would wait for the device)
        _expect_error(lambda: ops.embedding_bag_backward_padded(**s), "index out of range", "a bad index (CPU)")
    else:
        _finite(*ops.embedding_bag_backward_padded(**s))
    return n + 1


def _bad_index_paths(device: str, call: Callable[[dict], object]) -> int:
    s = sample_inputs("embedding_bag_backward", device, tokens=4, bag=6, rows=20, dim=32)
    s["indices"][1, 2] = 20
    s["indices"][3, 0] = -1
    _expect_error(lambda: call(s), "index out of range", "a bad index")
    with ops.index_checks(False):
        if device == "cpu":  # the CPU kernels always check
            _expect_error(lambda: call(s), "index out of range", "a bad index (checks off, CPU)")
        else:  # skipped, never read out of bounds
            out = call(s)
            _finite(*(out if isinstance(out, tuple) else (out,)))
    return 2


def cases_rows_to_dense(device: str) -> int:
    n = 0
    for dtype, dim in [(torch.bfloat16, 96), (torch.bfloat16, 3), (torch.float32, 1), (torch.float64, 5),
                       (torch.uint8, 7)]:
        _finite(ops.rows_to_dense(**sample_inputs("rows_to_dense", device, dtype, seed=n, n_rows=100, n_unique=5,
                                                  dim=dim)))
        n += 1
    bad_rows = torch.tensor([3, 1, 1, 500, -2], device=device)
    with ops.index_checks(False):
        if device == "cpu":
            _expect_error(lambda: ops.rows_to_dense(bad_rows, torch.randn(5, 8, device=device), 64), "rows",
                          "bad rows (checks off, CPU)")
        else:  # bad rows are skipped, never written out of bounds
            ops.rows_to_dense(bad_rows, torch.randn(5, 8, device=device), 64)
    unsorted = torch.tensor([3, 1], device=device)
    _expect_error(lambda: ops.rows_to_dense(unsorted, torch.randn(2, 8, device=device), 64), "strictly ascending",
                  "unsorted rows")
    return n + 2


def cases_pk_topk(device: str) -> int:
    n = 0
    for dtype, half, n_keys, k in TOPK_SHAPES:
        s = sample_inputs("pk_topk", device, dtype, seed=n, tokens=6, heads=2, n_keys=n_keys, half=half, k=k)
        query, keys = s["query"].requires_grad_(True), s["keys"].requires_grad_(True)
        scores, _ = ops.pk_topk(query, keys, k)
        _finite(scores)
        scores.sum().backward()  # through the embedding_bag kernels
        n += 1
    # Keys two elements into their storage: not 16-byte aligned, the element-wise loads.
    s = sample_inputs("pk_topk", device, torch.bfloat16, tokens=6, heads=2, n_keys=64, half=32, k=8)
    flat = torch.zeros(s["keys"].numel() + 2, device=device, dtype=torch.bfloat16)
    flat[2:] = s["keys"].flatten()
    _finite(ops.pk_topk(s["query"], flat[2:].view(s["keys"].shape), 8)[0])
    return n + 1


def cases_pk_topk_by_sorting(device: str) -> int:
    """The sorting path directly, and through pk_topk with a k beyond the fused CUDA
    kernel's shared memory (k = n_keys = 2048), where the two must agree."""
    s = sample_inputs("pk_topk", device, torch.bfloat16, tokens=6, heads=2, n_keys=40, half=16, k=40)
    query, keys = s["query"].requires_grad_(True), s["keys"].requires_grad_(True)
    scores, _ = ops.pk_topk_by_sorting(query, keys, 40)
    _finite(scores)
    scores.sum().backward()
    s = sample_inputs("pk_topk", device, torch.float32, tokens=3, heads=1, n_keys=2048, half=8, k=2048)
    fused, by_sorting = ops.pk_topk(s["query"], s["keys"], 2048), ops.pk_topk_by_sorting(s["query"], s["keys"], 2048)
    if not (torch.equal(fused[1], by_sorting[1]) and torch.equal(fused[0], by_sorting[0])):
        raise CaseError("pk_topk at k = 2048 differs from pk_topk_by_sorting")
    return 2


def cases_quantized_embedding_bag(device: str) -> int:
    n = 0
    for codes, dim, out_dtype, index_dtype in QUANT_SHAPES:
        # Bags of 33 lookups: 4 groups of the CUDA kernel's 8 rows in flight and one more;
        # bags of 5: fewer than 8, the group padded.
        s = sample_inputs("embedding_bag", device, seed=n, tokens=5, bag=(33, 5)[n % 2], rows=40, dim=dim,
                          index_dtype=index_dtype)
        _finite(ops.quantized_embedding_bag(quantize_rows(s["values"], codes), s["indices"], s["weights"], codes,
                                            out_dtype))
        n += 1
    s = sample_inputs("embedding_bag", device, tokens=3, bag=0, rows=40)  # empty bags
    _finite(ops.quantized_embedding_bag(quantize_rows(s["values"], "uint8"), s["indices"], s["weights"], "uint8"))
    return n + 1 + _bad_index_paths(
        device, lambda s: ops.quantized_embedding_bag(quantize_rows(s["values"], "uint8"), s["indices"], s["weights"],
                                                     "uint8")
    )


def cases_row_adam_(device: str) -> int:
    n = 0
    for dtype, dim in [(torch.float32, 16), (torch.bfloat16, 96), (torch.float16, 3), (torch.float64, 33),
                       (torch.float32, 1001)]:
        s = sample_inputs("row_adam_", device, dtype, seed=n, n_rows=200, dim=dim, n_unique=70)
        ops.row_adam_(**s)
        _finite(s["param"], s["exp_avg"], s["exp_avg_sq"])
        n += 1
    if device != "cpu":  # the CUDA kernel skips rows out of range (the CPU one rejects them)
        s = sample_inputs("row_adam_", device, torch.float32, n_rows=50, dim=8, n_unique=3)
        s["rows"] = torch.tensor([2, 49, 50], device=device)
        ops.row_adam_(**s)
        _finite(s["param"])
        n += 1
    return n


def cases_row_adam_capturable_(device: str) -> int:
    n = 0
    for dtype, dim in [(torch.float32, 16), (torch.bfloat16, 96), (torch.float64, 33)]:
        s = sample_inputs("row_adam_capturable_", device, dtype, seed=n, n_rows=200, dim=dim, n_unique=70)
        ops.row_adam_(**s)
        _finite(s["param"], s["exp_avg"], s["exp_avg_sq"])
        if int(s["step"]) != 3:
            raise AssertionError(f"row_adam_capturable_: step count {int(s['step'])} after one call from 2")
        n += 1
    return n


def cases_row_adagrad_(device: str) -> int:
    # Widths below, at and past a warp (the CUDA kernel's lanes stride a row by 32), and no rows.
    n = 0
    for dtype, dim in [(torch.float32, 1), (torch.bfloat16, 31), (torch.float16, 32), (torch.float64, 33),
                       (torch.bfloat16, 96), (torch.float32, 1001)]:
        s = sample_inputs("row_adagrad_", device, dtype, seed=n, n_rows=200, dim=dim, n_unique=70)
        ops.row_adagrad_(**s)
        _finite(s["param"], s["sum_sq"])
        n += 1
    s = sample_inputs("row_adagrad_", device, torch.float32, n_rows=50, dim=8, n_unique=0)
    ops.row_adagrad_(**s)
    n += 1
    if device != "cpu":  # the CUDA kernel skips rows out of range (the CPU one rejects them)
        s = sample_inputs("row_adagrad_", device, torch.float32, n_rows=50, dim=40, n_unique=3)
        s["rows"] = torch.tensor([2, 49, 50], device=device)
        ops.row_adagrad_(**s)
        _finite(s["param"], s["sum_sq"])
        n += 1
    else:
        s = sample_inputs("row_adagrad_", device, torch.float32, n_rows=50, dim=40, n_unique=3)
        s["rows"] = torch.tensor([2, 49, 50], device=device)
        _expect_error(lambda: ops.row_adagrad_(**s), "out of range", "a row out of range (CPU)")
        n += 1
    return n


def cases_embedding_bag_host_table(device: str) -> int:
    """embedding_bag on a CPU table mapped for the GPU by cuda_host_view: the kernel reads
    page-locked host memory at its host address."""
    if not device.startswith("cuda"):
        raise CaseSkipped("cuda_host_view maps a host table for the CUDA kernels; there is nothing to map on the CPU")
    # fp32 rows of 32: 16-byte vector loads, from a host table 64-byte aligned by torch's allocator.
    s = sample_inputs("embedding_bag", device, tokens=5, bag=33, rows=40, dim=32)
    view = cuda_host_view(s["values"].cpu(), device)
    out = ops.embedding_bag(view, s["indices"], s["weights"])
    _finite(out)
    # The same kernel on the device copy of the table: any difference is a wrong host read.
    if not torch.equal(out, ops.embedding_bag(s["values"], s["indices"], s["weights"])):
        raise CaseError("the host table's bags differ from those of its copy on the device")
    del view  # the last view: the registration ends here (after a device synchronisation)
    return 1


CASES: dict[str, Callable[[str], int]] = {
    "embedding_bag": cases_embedding_bag,
    "embedding_bag_backward": cases_embedding_bag_backward,
    "embedding_bag_backward_dense": cases_embedding_bag_backward_dense,
    "embedding_bag_backward_padded": cases_embedding_bag_backward_padded,
    "rows_to_dense": cases_rows_to_dense,
    "pk_topk": cases_pk_topk,
    "pk_topk_by_sorting": cases_pk_topk_by_sorting,
    "quantized_embedding_bag": cases_quantized_embedding_bag,
    "row_adam_": cases_row_adam_,
    "row_adam_capturable_": cases_row_adam_capturable_,
    "row_adagrad_": cases_row_adagrad_,
}

# Cases that are no op of their own, by name: the op they call, and the cases. They run
# after every op's cases, so that a fault (which ends the CUDA context) cannot hide those.
EXTRA_CASES: dict[str, tuple[str, Callable[[str], int]]] = {
    "embedding_bag_host_table": ("embedding_bag", cases_embedding_bag_host_table),
}


def ops_with_kernel(dispatch_key: str) -> list[str]:
    """Ops of the memory library that have a kernel for the dispatch key (CUDA, CPU)."""
    names = set()
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("memory::") and torch._C._dispatch_has_kernel_for_dispatch_key(schema.name,
                                                                                                 dispatch_key):
            names.add(schema.name.split("::", 1)[1])
    return sorted(names)


def run(device: str, only: list[str] | None) -> dict:
    """Runs the cases; returns the report (ran, extra, skipped, errors, findings, no_kernel)."""
    names = ops_with_kernel("CUDA" if device.startswith("cuda") else "CPU")
    report = dict(device=device, torch=torch.__version__, memory_ext=memory_ext.__version__, ran={}, extra={},
                  skipped={}, errors={}, findings=[], no_kernel=sorted(set(CASES) - set(names)))
    for name in names:
        if only and name not in only:
            continue
        if name not in CASES:
            finding = f"{name} has a {device} kernel but no cases here"
            report["findings"].append(finding)
            print(f"sanitize_cases: FINDING: {finding}", flush=True)
            continue
        _run_cases(name, CASES[name], device, report, report["ran"])
    for name, (op, cases) in EXTRA_CASES.items():
        if op in names and (not only or op in only or name in only):
            _run_cases(name, cases, device, report, report["extra"])
    return report


def _run_cases(name: str, cases: Callable[[str], int], device: str, report: dict, ran: dict) -> None:
    try:
        count = cases(device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    except CaseSkipped as e:
        report["skipped"][name] = str(e)
        print(f"sanitize_cases: {name} skipped: {e}", flush=True)
        return
    except Exception as e:  # recorded, and the other cases still run
        report["errors"][name] = f"{type(e).__name__}: {e}"
        print(f"sanitize_cases: {name} FAILED", flush=True)
        traceback.print_exc()
        return
    ran[name] = count
    print(f"sanitize_cases: {name} ok ({count} cases)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    parser.add_argument("--only", nargs="*", help="run only these ops (and extra cases, by op or name)")
    parser.add_argument("--report", help="write the report (ops and extra cases run, skips, errors, findings) as JSON here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and cuda_skip_reason() is not None:
        print(f"sanitize_cases: cannot run on {args.device}: {cuda_skip_reason()}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    report = run(args.device, args.only)
    if args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    if report["no_kernel"]:
        print(f"sanitize_cases: no {args.device} kernel (skipped): {', '.join(report['no_kernel'])}")
    print(f"sanitize_cases: {len(report['ran'])} ops ok, {len(report['extra'])} extra cases ok, "
          f"{len(report['skipped'])} skipped, {len(report['errors'])} failed, "
          f"{len(report['findings'])} findings" + "".join(f"; FINDING: {f}" for f in report["findings"]), flush=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

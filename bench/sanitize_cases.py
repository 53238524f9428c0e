"""Run every CUDA kernel of torch.ops.memory once, at small sizes, for compute-sanitizer.

    compute-sanitizer --tool memcheck python3 bench/sanitize_cases.py
    compute-sanitizer --tool racecheck python3 bench/sanitize_cases.py

Each op that has a CUDA kernel must have cases here; the cases pick shapes that reach
every launch shape of the kernels (sub-warp, warp, block and tiled rows; vector and scalar
loads; runs long enough to be split into segments) and the index-check paths (on, off,
and a reported bad index). An op with a CUDA kernel but no cases fails the run, so a new
kernel cannot slip past the sanitizer. Results are checked only for being finite: the
tests check values.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

import memory_ext
from memory_ext import ops

DEV = "cuda"


def _finite(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AssertionError("non-finite output")


def _bag_inputs(tokens, bag, rows, dim, dtype, idx_dtype=torch.int64, hot=False, w_dtype=torch.float32):
    values = torch.randn(rows, dim, device=DEV).to(dtype)
    indices = torch.randint(0, rows, (tokens, bag), device=DEV)
    if hot:  # one row takes most lookups: a run of several segments
        indices[:, : bag - 1] = 1
    weights = torch.randn(tokens, bag, device=DEV).to(w_dtype)
    grad_out = torch.randn(tokens, dim, device=DEV).to(dtype)
    return values, indices.to(idx_dtype), weights, grad_out


# Row widths per dtype reaching each launch shape of the forward and backward kernels.
_SHAPES = [
    # (dtype, dim) -> 16-byte vectors per row: bf16 8 -> 1, fp32 32 -> 8, bf16 96 -> 12,
    # bf16 256 -> 32, bf16 1000 -> 125, bf16 4096 -> 512, bf16 5000 -> 625 (tiled);
    # float64 uses 2-element vectors; odd widths (3, 17, 101, 1001) take the scalar path.
    (torch.bfloat16, 8), (torch.float32, 32), (torch.bfloat16, 96), (torch.bfloat16, 256),
    (torch.bfloat16, 1000), (torch.bfloat16, 4096), (torch.bfloat16, 5000), (torch.float64, 24),
    (torch.float64, 3000), (torch.bfloat16, 3), (torch.float32, 17), (torch.float16, 101),
    (torch.float16, 1001),
]


def cases_embedding_bag() -> None:
    for dtype, dim in _SHAPES:
        v, i, w, _ = _bag_inputs(5, 33, 40, dim, dtype, idx_dtype=torch.int32, w_dtype=dtype)
        _finite(ops.embedding_bag(v, i, w))
    v, i, w, _ = _bag_inputs(3, 0, 40, 16, torch.float32)
    _finite(ops.embedding_bag(v, i, w))  # empty bags
    _bad_index_paths(lambda v, i, w, g: ops.embedding_bag(v, i, w))


def cases_embedding_bag_backward() -> None:
    for dtype, dim in _SHAPES:
        for need_wg in (True, False):
            v, i, w, g = _bag_inputs(12, 100, 40, dim, dtype, hot=True)  # 1188 hits on row 1
            _finite(*ops.embedding_bag_backward(g, v, i, w, need_wg))
    _bad_index_paths(lambda v, i, w, g: ops.embedding_bag_backward(g, v, i, w, True))


def cases_rows_to_dense() -> None:
    for dtype, dim in [(torch.bfloat16, 96), (torch.bfloat16, 3), (torch.float32, 1), (torch.float64, 5),
                       (torch.uint8, 7)]:
        rows = torch.tensor([0, 5, 6, 40, 99], device=DEV)
        rg = (torch.randn(5, dim, device=DEV) * 10).to(dtype)
        _finite(ops.rows_to_dense(rows, rg, 100))
    with ops.index_checks(False):  # bad rows are skipped, never written out of bounds
        ops.rows_to_dense(torch.tensor([3, 1, 1, 500, -2], device=DEV), torch.randn(5, 8, device=DEV), 64)
    try:
        ops.rows_to_dense(torch.tensor([3, 1], device=DEV), torch.randn(2, 8, device=DEV), 64)
    except RuntimeError:
        pass
    else:
        raise AssertionError("unsorted rows were not reported")


def cases_pk_topk() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for n_keys, k in ((16, 4), (128, 32)):
            query = torch.randn(6, 2, 32, device=DEV, dtype=dtype, requires_grad=True)
            keys = torch.randn(2, 2, n_keys, 16, device=DEV, dtype=dtype, requires_grad=True)
            scores, idx = ops.pk_topk(query, keys, k)
            _finite(scores)
            scores.sum().backward()  # through the embedding_bag kernels


def _bad_index_paths(call: Callable) -> None:
    v, i, w, g = _bag_inputs(4, 6, 20, 32, torch.float32)
    i[1, 2] = 20
    i[3, 0] = -1
    try:
        call(v, i, w, g)
    except RuntimeError as e:
        assert "index out of range" in str(e), e
    else:
        raise AssertionError("bad index was not reported")
    with ops.index_checks(False):
        out = call(v, i, w, g)
    _finite(*(out if isinstance(out, tuple) else (out,)))


CASES: dict[str, Callable[[], None]] = {
    "embedding_bag": cases_embedding_bag,
    "embedding_bag_backward": cases_embedding_bag_backward,
    "rows_to_dense": cases_rows_to_dense,
    "pk_topk": cases_pk_topk,
}


def cuda_ops() -> list[str]:
    """Ops of the memory library that have a kernel for the CUDA dispatch key."""
    names = []
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("memory::"):
            name = schema.name.split("::", 1)[1]
            if torch._C._dispatch_has_kernel_for_dispatch_key(schema.name, "CUDA"):
                names.append(name)
    return sorted(set(names))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run only these ops")
    args = parser.parse_args()
    if not memory_ext.cuda_kernels_built() or not torch.cuda.is_available():
        print("sanitize_cases: needs a GPU and the CUDA kernels", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    names = cuda_ops()
    missing = [n for n in names if n not in CASES]
    status = 0
    for name in names:
        if name in missing or (args.only and name not in args.only):
            continue
        CASES[name]()
        torch.cuda.synchronize()
        print(f"sanitize_cases: {name} ok", flush=True)
    for name in missing:
        print(f"sanitize_cases: {name} has a CUDA kernel but no cases here", file=sys.stderr)
        status = 1
    not_cuda = sorted(set(CASES) - set(names))
    if not_cuda:
        print(f"sanitize_cases: no CUDA kernel (skipped): {', '.join(not_cuda)}")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Weighted embedding bag: memory_ext vs torch's F.embedding_bag and FBGEMM's TBE.

Bytes per forward = rows read (tokens * bag * dim * elem) + output written + indices +
weights; the backward moves the same rows again (value rows for the weight gradient,
grad_out rows for the value gradient) plus the gradients it writes. Bandwidth is shown
next to the copy bandwidth measured in the same run.

    python bench/bench_embedding_bag.py [--device cpu|cuda] [--out bench/out/embedding_bag.json]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth_gbs, machine_info, print_table, save_json, time_ms  # noqa: E402

import memory_ext  # noqa: E402


def load_fbgemm():
    try:
        import fbgemm_gpu  # noqa: F401
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen

        return DenseTableBatchedEmbeddingBagsCodegen, PoolingMode
    except Exception as e:  # an optional peer: any import failure means skip it
        print(f"FBGEMM skipped: {type(e).__name__}: {e}")
        return None


def bench_case(tokens, bag, rows, dim, dtype, device, iters, fbgemm):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(rows, dim, generator=g).to(dtype).to(device)
    indices = torch.randint(0, rows, (tokens, bag), generator=g).to(device)
    weights = torch.rand(tokens, bag, generator=g).to(device)
    grad_out = torch.randn(tokens, dim, generator=g).to(dtype).to(device)
    elem = values.element_size()
    fwd_bytes = tokens * bag * dim * elem + tokens * dim * elem + tokens * bag * (8 + 4)
    n_unique = int(torch.unique(indices).numel())
    # backward: read grad_out rows per lookup and each touched value row once, write the
    # touched gradient rows and the weight gradient.
    bwd_bytes = tokens * bag * dim * elem + n_unique * dim * elem * 2 + tokens * bag * (8 + 4 + 4)
    results = []

    def add(impl, what, ms, nbytes):
        results.append(dict(impl=impl, op=what, dtype=str(dtype).replace("torch.", ""), ms=ms,
                            gbs=nbytes / (ms * 1e-3) / 1e9 if nbytes else None))

    # -- memory_ext
    add("memory_ext", "forward", time_ms(lambda: memory_ext.embedding_bag(values, indices, weights), device, iters=iters), fwd_bytes)
    add("memory_ext", "backward (sparse)", time_ms(lambda: memory_ext.embedding_bag_backward(grad_out, values, indices, weights, True), device, iters=iters), bwd_bytes)

    def ours_fwd_bwd_sparse():
        memory_ext.embedding_bag(values, indices, weights)
        memory_ext.embedding_bag_backward(grad_out, values, indices, weights, True)

    add("memory_ext", "fwd+bwd sparse", time_ms(ours_fwd_bwd_sparse, device, iters=iters), fwd_bytes + bwd_bytes)
    v_leaf = values.clone().requires_grad_(True)
    w_leaf = weights.clone().requires_grad_(True)

    def ours_fwd_bwd_dense():
        v_leaf.grad = None
        w_leaf.grad = None
        memory_ext.embedding_bag(v_leaf, indices, w_leaf).backward(grad_out)

    add("memory_ext", "fwd+bwd dense", time_ms(ours_fwd_bwd_dense, device, iters=max(3, iters // 2)), None)
    del v_leaf

    # -- torch: per-sample weights must have the table's dtype.
    psw = weights.to(dtype)
    add("torch", "forward", time_ms(lambda: F.embedding_bag(indices, values, mode="sum", per_sample_weights=psw), device, iters=iters), fwd_bytes)
    for sparse in (True, False):
        t_leaf = values.clone().requires_grad_(True)
        p_leaf = psw.clone().requires_grad_(True)

        def torch_fwd_bwd():
            t_leaf.grad = None
            p_leaf.grad = None
            F.embedding_bag(indices, t_leaf, mode="sum", per_sample_weights=p_leaf, sparse=sparse).backward(grad_out)

        add("torch", f"fwd+bwd {'sparse' if sparse else 'dense'}", time_ms(torch_fwd_bwd, device, warmup=1, iters=max(3, iters // 2)), None)
        del t_leaf

    # -- FBGEMM (CPU table-batched embedding, float32 only)
    if fbgemm is not None and device == "cpu" and dtype == torch.float32:
        TBE, PoolingMode = fbgemm
        tbe = TBE([(rows, dim)], pooling_mode=PoolingMode.SUM, use_cpu=True)
        with torch.no_grad():
            tbe.weights.copy_(values.reshape(-1))
        flat = indices.reshape(-1)
        offsets = torch.arange(0, tokens * bag + 1, bag)
        flat_w = weights.reshape(-1).clone().requires_grad_(True)
        add("fbgemm", "forward", time_ms(lambda: tbe(flat, offsets, per_sample_weights=flat_w.detach()), device, iters=iters), fwd_bytes)

        def fbgemm_fwd_bwd():
            tbe.weights.grad = None
            flat_w.grad = None
            tbe(flat, offsets, per_sample_weights=flat_w).backward(grad_out)

        add("fbgemm", "fwd+bwd dense", time_ms(fbgemm_fwd_bwd, device, warmup=1, iters=max(3, iters // 2)), None)
        del tbe
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=None)
    p.add_argument("--bag", type=int, default=128)
    p.add_argument("--rows", type=int, default=1 << 20)
    p.add_argument("--dims", type=int, nargs="+", default=None)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--out", default="bench/out/embedding_bag.json")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    tokens_list = args.tokens or ([16384, 65536] if cuda else [4096])
    dims = args.dims or ([1024, 4096] if cuda else [512])
    fbgemm = load_fbgemm() if not cuda else None

    info = machine_info(args.device)
    copy = copy_bandwidth_gbs(args.device)
    print(f"device {args.device} ({info.get('gpu', info['cpu'])}), threads {info['threads']}, "
          f"copy bandwidth {copy:.1f} GB/s")
    rows = []
    for dtype_name in args.dtypes:
        for dim in dims:
            for tokens in tokens_list:
                case = dict(tokens=tokens, bag=args.bag, rows=args.rows, dim=dim)
                for r in bench_case(tokens, args.bag, args.rows, dim, getattr(torch, dtype_name), args.device, args.iters, fbgemm):
                    r.update(case)
                    r["pct_copy"] = 100 * r["gbs"] / copy if r["gbs"] else None
                    rows.append(r)
    # Speed-ups against the peers on the same case: each of our rows is compared with the
    # peer row doing the same work (forward; fwd+bwd with a sparse or dense value gradient;
    # FBGEMM's CPU path has only the dense one).
    peer_op = {"forward": ("forward", "forward"), "fwd+bwd sparse": ("fwd+bwd sparse", "fwd+bwd dense"),
               "fwd+bwd dense": ("fwd+bwd dense", "fwd+bwd dense")}
    for r in rows:
        if r["impl"] != "memory_ext" or r["op"] not in peer_op:
            continue
        same = {(q["impl"], q["op"]): q["ms"] for q in rows
                if (q["dtype"], q["dim"], q["tokens"]) == (r["dtype"], r["dim"], r["tokens"])}
        torch_op, fbgemm_op = peer_op[r["op"]]
        if ("torch", torch_op) in same:
            r["x_torch"] = same[("torch", torch_op)] / r["ms"]
        if ("fbgemm", fbgemm_op) in same:
            r["x_fbgemm"] = same[("fbgemm", fbgemm_op)] / r["ms"]
    cols = ["impl", "op", "dtype", "dim", "tokens", "ms", "gbs", "pct_copy", "x_torch", "x_fbgemm"]
    print_table(rows, cols)
    save_json(args.out, dict(benchmark="embedding_bag", machine=info, copy_gbs=copy, results=rows))


if __name__ == "__main__":
    main()

"""One memory layer's whole training step against its table size N, for several peers.

A step is the layer's query projection, the product-key top-k, the softmax, the weighted
bag of heads * k value rows per token, the backward, and the optimizer step over the
value table and the layer's other parameters (loss: mean square error against a fixed
random target). The layer is the same for every peer: query Linear(dim, heads * k_dim)
with bias, k_dim = dim / 2, keys (heads, 2, n_keys, k_dim / 2), no query/key norm and no
output gate (ProductKeyMemory(qk_norm=False, swilu=False)); the package peer keeps its own
query LayerNorm. N = 2^14, 2^16, ... (n_keys = sqrt(N)), fp32. Peers:

  sparse         "memory_ext sparse": ProductKeyMemory over MemoryValues(N, dim), the
                 README recipe: torch AdamW over param_groups(model, lr) (everything but
                 the values) and value_optimizer(model, lr) (SparseRowAdam on the sparse
                 gradient of the rows read)
  fused          "memory_ext fused": the same, value_optimizer(model, lr, fused=True)
                 (the row update made in the backward, no gradient stored)
  fused_adagrad  "memory_ext fused adagrad": value_optimizer(model, lr, fused=True,
                 rule="adagrad"), row-wise Adagrad (one float of state per row)
  dense          "memory_ext dense": the table's dense gradient, AdamW over everything
                 (param_groups(model, lr, values="dense"))
  torch          "torch EmbeddingBag": the same layer in plain PyTorch ops (both halves'
                 scores by matmul, topk per half, the k x k candidate sums, topk, softmax)
                 and nn.EmbeddingBag(N, dim, mode="sum") with per_sample_weights; AdamW
  pkm            "product-key-memory": the PyPI package's PKM, trained as its README shows
                 (Adam over fetch_optimizer_parameters); optional: pip install
                 product-key-memory, skipped with the reason in the JSON when absent

Each (shape, peer, N) runs in its own process (forked from a server that has imported
torch and the peers once), so its peak resident set is its own and its memory is released
before the next one. An N is skipped for a peer, with the estimate in the JSON, when the
bytes it needs (table, dense gradient, optimizer state, the largest optimizer
temporaries, activations, the process itself) exceed 80% of physical memory (of GPU
memory with --device cuda). By default N grows while some peer still fits.

    python bench/bench_scaling.py [--device cpu|cuda] [--quick] [--min-log2 14] [--max-log2 22]
        [--shapes heads1_k32 heads4_k32] [--peers sparse dense ...] [--repeats 5] [--warmup 2]
        [--threads T] [--out bench/results/scaling_cpu.json]

Writes the JSON (rewritten after every configuration, "complete": false until the end)
and a plot next to it (same name, .png); --quick writes to bench/out/ unless --out is
given. Prints a table and the issue's target checks at 32 rows per token, each as the
measured ratio and met / not met.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import math
import multiprocessing as mp
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, print_table, recorded_options, save_json, spread_ms, time_samples_ms  # noqa: E402

from memory_ext.nn import MemoryValues, ProductKeyMemory, param_groups, value_optimizer  # noqa: E402
from memory_ext.testing import generator  # noqa: E402

try:  # an optional peer: any import failure means skip it
    from product_key_memory import PKM, fetch_optimizer_parameters
except Exception as e:
    PKM, fetch_optimizer_parameters = None, None
    PKM_MISSING = f"product-key-memory not installed ({type(e).__name__}: {e}); pip install product-key-memory"

SHAPES = {
    "heads1_k32": dict(tokens=4096, dim=128, heads=1, k=32),  # 32 rows per token
    "heads4_k32": dict(tokens=4096, dim=128, heads=4, k=32),  # the paper's 128 rows per token
}
PEERS = {
    "sparse": "memory_ext sparse",
    "fused": "memory_ext fused",
    "fused_adagrad": "memory_ext fused adagrad",
    "dense": "memory_ext dense",
    "torch": "torch EmbeddingBag",
    "pkm": "product-key-memory",
}
LR, VALUES_LR_SCALE, SEED = 1e-3, 10.0, 0
MEMORY_FRACTION = 0.8
TARGET_SHAPE = "heads1_k32"


# ---------------------------------------------------------------------------------------
# The peers. Each builder takes (n_rows, shape, device) and returns (the layer: a callable
# x (tokens, dim) -> (tokens, dim), its optimizers, how it was built in words).


def _memory_ext_layer(n_rows: int, shape: dict, device: str) -> ProductKeyMemory:
    values = MemoryValues(n_rows, shape["dim"], device=device)
    return ProductKeyMemory(shape["dim"], n_keys=math.isqrt(n_rows), heads=shape["heads"], k=shape["k"],
                            values=values, qk_norm=False, swilu=False, device=device)


def _layer_words(model: ProductKeyMemory) -> str:
    return (f"ProductKeyMemory({model.dim}, n_keys={model.n_keys}, heads={model.heads}, k={model.k}, "
            f"k_dim={model.k_dim}, qk_norm=False, swilu=False) over MemoryValues({model.values.n_rows}, "
            f"{model.values.dim})")


def _build_row_path(n_rows, shape, device, **options):
    """The README recipe: AdamW over param_groups, value_optimizer(**options) for the table."""
    model = _memory_ext_layer(n_rows, shape, device)
    opts = [torch.optim.AdamW(param_groups(model, LR), lr=LR),
            value_optimizer(model, LR, values_lr_scale=VALUES_LR_SCALE, **options)]
    args = "".join(f", {k}={v!r}" for k, v in options.items())
    return model, opts, (f"{_layer_words(model)}; torch.optim.AdamW(param_groups(model, {LR})) + "
                         f"value_optimizer(model, {LR}, values_lr_scale={VALUES_LR_SCALE}{args}) "
                         f"({type(opts[1]).__name__})")


def build_sparse(n_rows, shape, device):
    return _build_row_path(n_rows, shape, device)


def build_fused(n_rows, shape, device):
    return _build_row_path(n_rows, shape, device, fused=True)


def build_fused_adagrad(n_rows, shape, device):
    return _build_row_path(n_rows, shape, device, fused=True, rule="adagrad")


def build_dense(n_rows, shape, device):
    model = _memory_ext_layer(n_rows, shape, device)
    opts = [torch.optim.AdamW(param_groups(model, LR, values="dense"), lr=LR)]
    return model, opts, f"{_layer_words(model)}; torch.optim.AdamW(param_groups(model, {LR}, values='dense'))"


class TorchProductKeyLayer(nn.Module):
    """ProductKeyMemory(qk_norm=False, swilu=False) in plain PyTorch ops: (tokens, dim) -> (tokens, dim)."""

    def __init__(self, n_rows: int, dim: int, heads: int, k: int, device: str) -> None:
        super().__init__()
        self.n_keys, self.heads, self.k, self.k_dim = math.isqrt(n_rows), heads, k, dim // 2
        self.query = nn.Linear(dim, heads * self.k_dim, device=device)
        self.keys = nn.Parameter(torch.empty(heads, 2, self.n_keys, self.k_dim // 2, device=device))
        self.values = nn.EmbeddingBag(n_rows, dim, mode="sum", device=device)
        # ProductKeyMemory's and MemoryValues' initialisation.
        nn.init.uniform_(self.keys, -self.k_dim**-0.5, self.k_dim**-0.5)
        nn.init.xavier_uniform_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        nn.init.normal_(self.values.weight, 0.0, dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        query = self.query(x).view(tokens, self.heads, 2, self.k_dim // 2)
        scores = torch.einsum("thpd,hpnd->thpn", query, self.keys)  # both halves: (tokens, heads, 2, n_keys)
        s1, i1 = scores[:, :, 0].topk(self.k, dim=-1)
        s2, i2 = scores[:, :, 1].topk(self.k, dim=-1)
        candidates = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (tokens, heads, k * k)
        candidate_rows = (i1.unsqueeze(-1) * self.n_keys + i2.unsqueeze(-2)).flatten(-2)
        top, pos = candidates.topk(self.k, dim=-1)
        weights = torch.softmax(top, dim=-1)
        rows = candidate_rows.gather(-1, pos)
        return self.values(rows.view(tokens, -1), per_sample_weights=weights.view(tokens, -1))


def build_torch(n_rows, shape, device):
    model = TorchProductKeyLayer(n_rows, shape["dim"], shape["heads"], shape["k"], device)
    # The groups param_groups makes for the memory_ext layers.
    groups = [
        {"params": [model.query.weight, model.keys], "weight_decay": 0.1},
        {"params": [model.query.bias], "weight_decay": 0.0},
        {"params": [model.values.weight], "lr": LR * VALUES_LR_SCALE, "weight_decay": 0.0},
    ]
    return model, [torch.optim.AdamW(groups, lr=LR)], (
        f"plain torch ops (einsum scores of both halves, topk per half, k x k sums, topk, softmax; "
        f"k_dim={model.k_dim}) + nn.EmbeddingBag({n_rows}, {shape['dim']}, mode='sum', sparse=False) with "
        f"per_sample_weights; torch.optim.AdamW (lr {LR}, values lr {LR * VALUES_LR_SCALE}, weight decay 0.1 on "
        f"matrices, 0 on bias and values)")


def build_pkm(n_rows, shape, device):
    dim_head = shape["dim"] // 4  # each query half as wide as the other peers' (k_dim / 2)
    layer = PKM(shape["dim"], heads=shape["heads"], num_keys=math.isqrt(n_rows), topk=shape["k"],
                dim_head=dim_head).to(device)
    values = layer.values
    opt = torch.optim.Adam(fetch_optimizer_parameters(layer, pkm_learning_rate=LR * VALUES_LR_SCALE), lr=LR)

    def forward(x):
        return layer(x.unsqueeze(0)).squeeze(0)  # PKM takes (batch, tokens, dim)

    return forward, [opt], (
        f"PKM({shape['dim']}, heads={shape['heads']}, num_keys={math.isqrt(n_rows)}, topk={shape['k']}, "
        f"dim_head={dim_head}), other arguments default (use_layernorm={layer.use_layernorm}: LayerNorm over each "
        f"query half; query Linear bias={layer.to_queries.bias is not None}; no dropout; differentiable_topk={layer.differentiable_topk}); "
        f"values {type(values).__name__}({values.num_embeddings}, {values.embedding_dim}, mode='{values.mode}', "
        f"sparse={values.sparse}), so a dense value gradient; "
        f"torch.optim.Adam(fetch_optimizer_parameters(layer, pkm_learning_rate={LR * VALUES_LR_SCALE}), lr={LR}) "
        f"as the package README shows; input viewed as (1, tokens, dim)")


BUILDERS = {
    "sparse": build_sparse,
    "fused": build_fused,
    "fused_adagrad": build_fused_adagrad,
    "dense": build_dense,
    "torch": build_torch,
    "pkm": build_pkm,
}


def unavailable(peer: str) -> str | None:
    """Why peer cannot run in this environment, or None."""
    if peer == "pkm" and PKM is None:
        return PKM_MISSING
    return None


# ---------------------------------------------------------------------------------------
# Memory: what a configuration needs, and what it used.


def needed_bytes(peer: str, shape: dict, n_rows: int, process_bytes: int) -> dict:
    """Estimated peak bytes of one configuration, by part (fp32 throughout)."""
    table = n_rows * shape["dim"] * 4
    parts = {"table": table}
    if peer == "sparse":
        parts["adam_moments"] = 2 * table  # SparseRowAdam keeps both moments for every row
    elif peer == "fused":
        parts["adam_moments"] = 2 * table  # the same SparseRowAdam
    elif peer == "fused_adagrad":
        parts["adagrad_row_state"] = n_rows * 4  # SparseRowAdagrad: one fp32 per row
    else:
        parts["dense_gradient"] = table
        parts["adam_moments"] = 2 * table
        # torch's single-tensor Adam(W) (the CPU default) builds denom = exp_avg_sq.sqrt() /
        # bias_correction: two table-sized temporaries alive at once.
        parts["adam_temporaries"] = 2 * table
    tokens, heads, k, n_keys = shape["tokens"], shape["heads"], shape["k"], math.isqrt(n_rows)
    # Both halves' scores and their gradient, the k x k candidates (score, row, gradient):
    # the plain-PyTorch peers' bound; memory_ext's pk_topk holds less.
    parts["activations"] = 2 * tokens * heads * 2 * n_keys * 4 + tokens * heads * k * k * 16
    parts["process"] = process_bytes
    parts["total"] = sum(parts.values())
    return parts


def memory_budget(device: str) -> dict:
    if device.startswith("cuda"):
        total, basis = torch.cuda.get_device_properties(torch.device(device)).total_memory, "GPU memory"
    else:
        total, basis = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical RAM"
    return {"basis": basis, "total_bytes": total, "fraction": MEMORY_FRACTION,
            "budget_bytes": int(total * MEMORY_FRACTION)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------
# One configuration, in its own process.


def measure(peer: str, shape: dict, log2_n: int, device: str, threads: int, warmup: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    start_rss = _rss_bytes()
    n_rows = 1 << log2_n
    torch.manual_seed(SEED)
    forward, optimizers, configuration = BUILDERS[peer](n_rows, shape, device)
    g = generator(device, SEED)
    x = torch.randn(shape["tokens"], shape["dim"], generator=g, device=device)
    target = torch.randn(shape["tokens"], shape["dim"], generator=g, device=device)
    losses = []

    def step():
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(forward(x), target)
        loss.backward()
        for opt in optimizers:
            opt.step()
        losses.append(loss.detach())

    t0 = time.perf_counter()
    samples = time_samples_ms(step, device, warmup=warmup, iters=repeats)
    out = dict(status="ok", **spread_ms(samples), samples_ms=samples, wall_s=time.perf_counter() - t0,
               start_rss_bytes=start_rss,
               peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
               first_loss=losses[0].item(), last_loss=losses[-1].item(), configuration=configuration)
    out["tokens_per_s"] = shape["tokens"] / (out["median_ms"] * 1e-3)
    if device.startswith("cuda"):
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    return out


def _child(kwargs: dict, conn) -> None:
    try:
        conn.send(measure(**kwargs))
    except Exception as e:  # reported as this configuration's error; the run goes on
        conn.send({"status": "error", "reason": f"{type(e).__name__}: {e}"[:2000]})
    finally:
        conn.close()


def process_context():
    """Where the configurations' processes come from: a fork server that imported torch and
    the peers once (a fresh interpreter per configuration would spend seconds on imports)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # Named explicitly: the default preload of __main__ does not happen on every Python.
    ctx.set_forkserver_preload(["torch", "memory_ext.nn", "memory_ext.testing"]
                               + (["product_key_memory"] if PKM is not None else []))
    return ctx


def run_isolated(ctx, kwargs: dict, timeout_s: float) -> dict:
    """measure(**kwargs) in a fresh process; an error or crash comes back as a status."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(kwargs, send), daemon=True)
    proc.start()
    send.close()
    result, answered = None, False
    try:
        answered = recv.poll(timeout_s)
        if answered:
            result = recv.recv()
    except EOFError:  # the child died before answering
        pass
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result is None:
        code = proc.exitcode
        if not answered:
            why = f"no result within {timeout_s:.0f} s (stopped)"
        else:
            why = f"process ended with exit code {code}" + (" (SIGKILL: out of memory?)" if code == -9 else "")
        result = {"status": "error", "reason": why}
    recv.close()
    return result


# ---------------------------------------------------------------------------------------
# Target checks and the plot.


def _ok_times(rows: list[dict], shape: str) -> dict:
    return {(r["peer"], r["log2_n"]): r["median_ms"] for r in rows if r["shape"] == shape and r["status"] == "ok"}


def target_checks(rows: list[dict]) -> list[dict]:
    """The issue's targets at 32 rows per token, from the measured medians."""
    t = _ok_times(rows, TARGET_SHAPE)
    checks = []
    for peer in ("sparse", "fused"):
        name = PEERS[peer]
        mine = {n: ms for (p, n), ms in t.items() if p == peer}
        largest = max(mine, default=None)
        check = dict(peer=peer, shape=TARGET_SHAPE, check=f"{name}: time at the largest N <= 1.2x its time at 2^20",
                     target="<= 1.2")
        if 20 in mine and largest > 20:
            ratio = mine[largest] / mine[20]
            check.update(measured=ratio, at=f"2^{largest} vs 2^20", met=ratio <= 1.2)
        else:
            check.update(measured=None, met=None, note=f"needs {name} measured at 2^20 and a larger N")
        checks.append(check)

        check = dict(peer=peer, shape=TARGET_SHAPE, check=f"{name}: >= 20x faster than torch EmbeddingBag at 2^22",
                     target=">= 20")
        if 22 in mine and ("torch", 22) in t:
            ratio = t[("torch", 22)] / mine[22]
            check.update(measured=ratio, met=ratio >= 20)
        else:
            check.update(measured=None, met=None, note=f"needs {name} and torch EmbeddingBag measured at 2^22")
        checks.append(check)

        check = dict(peer=peer, shape=TARGET_SHAPE, check=f"{name}: faster than product-key-memory at every N",
                     target="> 1 at every N")
        both = sorted(n for n in mine if ("pkm", n) in t)
        if both:
            ratios = {f"2^{n}": t[("pkm", n)] / mine[n] for n in both}
            check.update(measured=min(ratios.values()), per_n=ratios, met=all(r > 1 for r in ratios.values()))
            alone = sorted(n for n in mine if ("pkm", n) not in t)
            if alone:
                check["note"] = "product-key-memory not measured at " + ", ".join(f"2^{n}" for n in alone)
        else:
            check.update(measured=None, met=None, note=f"{name if not mine else 'product-key-memory'} not measured")
        checks.append(check)
    return checks


def print_checks(checks: list[dict]) -> None:
    print(f"\ntarget checks ({TARGET_SHAPE}: 32 rows per token, median step times):")
    for c in checks:
        if c["measured"] is None:
            print(f"  [not measured] {c['check']}: {c['note']}")
            continue
        verdict = "met" if c["met"] else "NOT met"
        extra = f" ({c['at']})" if "at" in c else ""
        extra += f"; {c['note']}" if "note" in c else ""
        print(f"  [{verdict}] {c['check']}: measured {c['measured']:.3g}x{extra} (target {c['target']})")


def plot(payload: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError as e:
        print(f"plot skipped: {e}")
        return
    rows, shapes = payload["results"], payload["config"]["shapes"]
    device_memory = payload["config"]["device"].startswith("cuda")
    fig, axes = plt.subplots(2, len(shapes), figsize=(max(10.0, 6.5 * len(shapes)), 8), squeeze=False, sharex=True)
    for j, shape in enumerate(shapes):
        s = SHAPES[shape] | payload["config"]["shape_overrides"]
        for peer in payload["config"]["peers"]:
            ok = sorted((r for r in rows if r["shape"] == shape and r["peer"] == peer and r["status"] == "ok"),
                        key=lambda r: r["log2_n"])
            if not ok:
                continue
            xs = [r["log2_n"] for r in ok]
            med = [r["median_ms"] for r in ok]
            err = [[m - r["min_ms"] for m, r in zip(med, ok, strict=True)],
                   [r["max_ms"] - m for m, r in zip(med, ok, strict=True)]]
            axes[0][j].errorbar(xs, med, yerr=err, marker="o", capsize=3, label=PEERS[peer])
            mem = [r["peak_device_bytes" if device_memory else "peak_rss_bytes"] / 2**30 for r in ok]
            axes[1][j].plot(xs, mem, marker="o", label=PEERS[peer])
        axes[0][j].set_title(f"{shape}: {s['heads'] * s['k']} rows/token, {s['tokens']} tokens, dim {s['dim']}")
        axes[0][j].set_yscale("log")
        axes[0][j].set_ylabel("ms per training step (median; bars: min-max)")
        axes[1][j].set_yscale("log")
        axes[1][j].set_ylabel("peak GPU memory allocated (GiB)" if device_memory else "peak resident set (GiB)")
        axes[1][j].set_xlabel("log2 N (value rows)")
        for ax in axes[:, j]:
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xticks(payload["config"]["log2_n"])
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis(FuncFormatter(lambda v, _: f"{v:.3g}"))
            ax.legend(fontsize=8)
    m = payload["machine"]
    fig.suptitle(f"one memory layer's training step vs table size N ({payload['config']['device']}: "
                 f"{m.get('gpu', m['cpu'])}, {m['threads']} threads, commit {m['commit']})", fontsize=10)
    absent = [f"{p['name']} ({p['unavailable']})" for p in payload["peers"].values() if p["unavailable"]]
    if absent:
        fig.text(0.01, 0.005, "not measured: " + "; ".join(absent), fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot written to {path}")


# ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-log2", type=int, default=14)
    p.add_argument("--max-log2", type=int, default=None, help="default: the largest N some peer fits in memory")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--peers", nargs="+", choices=list(PEERS), default=list(PEERS))
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 5; --quick: 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; --quick: 1)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--timeout", type=float, default=None, help="seconds per configuration (default 3600; --quick: 60)")
    p.add_argument("--quick", action="store_true", help="tiny: N up to 2^16, 64 tokens, 1 repeat (a smoke run)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/scaling_<device>.json; "
                   "--quick: bench/out/scaling_<device>_quick.json); the plot goes next to it")
    args = p.parse_args(argv)
    if args.quick and args.max_log2 is None:
        args.max_log2 = 16
    for name in ("min_log2", "max_log2"):
        value = getattr(args, name)
        if value is not None and (value % 2 or value < 2):
            p.error(f"--{name.replace('_', '-')} must be even and >= 2 (N = n_keys^2), got {value}")
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.timeout = args.timeout or (60 if args.quick else 3600)
    kind = args.device.split(":")[0]
    args.out = args.out or (f"bench/out/scaling_{kind}_quick.json" if args.quick else f"bench/results/scaling_{kind}.json")
    return args


def main(argv=None):
    args = parse_args(argv)
    shapes = {name: SHAPES[name] | ({"tokens": 64} if args.quick else {}) for name in args.shapes}
    info = machine_info(args.device)
    budget = memory_budget(args.device)
    process_bytes = 0 if args.device.startswith("cuda") else _rss_bytes()  # the children start from the same imports
    why_not = {peer: unavailable(peer) for peer in args.peers}
    runnable = [peer for peer in args.peers if why_not[peer] is None]

    def fits(peer, shape, log2_n):
        return needed_bytes(peer, shape, 1 << log2_n, process_bytes)["total"] <= budget["budget_bytes"]

    if args.max_log2 is None:  # grow N while some peer still fits
        args.max_log2 = args.min_log2
        while any(fits(p, s, args.max_log2 + 2) for p in runnable for s in shapes.values()):
            args.max_log2 += 2
    log2_ns = list(range(args.min_log2, args.max_log2 + 1, 2))

    versions = {"torch": torch.__version__, "memory_ext": info["memory_ext"]}
    versions["product-key-memory"] = importlib.metadata.version("product-key-memory") if PKM is not None else None
    config = dict(recorded_options(args), shapes=args.shapes, shape_overrides={"tokens": 64} if args.quick else {},
                  log2_n=log2_ns, lr=LR, values_lr_scale=VALUES_LR_SCALE, seed=SEED, dtype="float32",
                  loss="mse_loss(layer(x), target), x and target randn (tokens, dim), the same for every peer")
    payload = dict(benchmark="scaling", machine=info, versions=versions, memory=budget, config=config,
                   shapes={name: dict(s, rows_per_token=s["heads"] * s["k"]) for name, s in shapes.items()},
                   peers={peer: {"name": PEERS[peer], "unavailable": why_not[peer]} for peer in args.peers},
                   complete=False, results=[], target_checks=[])
    print(f"device {args.device} ({info.get('gpu', info['cpu'])}), {args.threads} threads, "
          f"memory budget {budget['budget_bytes'] / 2**30:.1f} GiB ({MEMORY_FRACTION:.0%} of {budget['basis']}); "
          f"N = 2^{log2_ns[0]} .. 2^{log2_ns[-1]}")
    for peer, why in why_not.items():
        if why:
            print(f"{PEERS[peer]} skipped: {why}")

    ctx = process_context()
    for shape_name, shape in shapes.items():
        for log2_n in log2_ns:
            for peer in args.peers:
                n_rows = 1 << log2_n
                need = needed_bytes(peer, shape, n_rows, process_bytes)
                row = dict(shape=shape_name, peer=peer, name=PEERS[peer], log2_n=log2_n, n_rows=n_rows,
                           n_keys=math.isqrt(n_rows), rows_per_token=shape["heads"] * shape["k"],
                           tokens=shape["tokens"], needed_bytes=need)
                if why_not[peer]:
                    row.update(status="skipped", reason=why_not[peer])
                elif need["total"] > budget["budget_bytes"]:
                    row.update(status="skipped", reason=(
                        f"needs about {need['total'] / 2**30:.1f} GiB, more than {MEMORY_FRACTION:.0%} of "
                        f"{budget['basis']} ({budget['budget_bytes'] / 2**30:.1f} GiB)"))
                else:
                    kwargs = dict(peer=peer, shape=shape, log2_n=log2_n, device=args.device, threads=args.threads,
                                  warmup=args.warmup, repeats=args.repeats)
                    row.update(run_isolated(ctx, kwargs, args.timeout))
                payload["results"].append(row)
                save_json(args.out, payload, quiet=True)
                if row["status"] == "ok":
                    print(f"  {shape_name} 2^{log2_n} {PEERS[peer]}: {row['median_ms']:.1f} ms, "
                          f"peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB")
                elif row["status"] == "error":
                    print(f"  {shape_name} 2^{log2_n} {PEERS[peer]}: error: {row['reason']}")

    table = [dict(r, peak_rss_gib=r.get("peak_rss_bytes", 0) / 2**30 or None,
                  needed_gib=r["needed_bytes"]["total"] / 2**30,
                  note=r.get("reason", "") if r["status"] != "ok" else "")
             for r in payload["results"] if r["status"] != "skipped" or why_not[r["peer"]] is None]
    print()
    print_table(table, ["shape", "name", "log2_n", "n_keys", "median_ms", "min_ms", "max_ms", "tokens_per_s",
                        "peak_rss_gib", "needed_gib", "status", "note"])
    payload["target_checks"] = target_checks(payload["results"])
    print_checks(payload["target_checks"])
    payload["complete"] = True
    save_json(args.out, payload)
    plot(payload, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()

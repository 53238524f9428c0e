"""Decoding with the KV cache: tokens/s and per-token latency of a dense Decoder and a Memory+
Decoder, and the share of a decode step the memory layers and their lookup take.

    python bench/bench_decode.py [--device cpu|cuda] [--threads 2] [--quick] [--out bench/results/decode_cpu.json]

Configurations (both built from one seed; the Memory+ model is the dense one with the FFNs
of memory_placement(layers) swapped for ProductKeyMemory layers sharing one pool):

- demo: the recall demo's model (memory_ext.demo: dim 128, 6 layers, 4 heads, vocabulary
  288 of its 300-entity fact set, 4 memory heads reading 16 rows each) with 128^2 value
  rows, its memory size until the demo took 32^2;
- large: dim 512, 8 layers, 8 heads, vocabulary 32000, 512^2 = 262144 value rows of 512
  floats (512 MiB), 4 memory heads reading 32 rows each, max_seq_len 256.

Per-token latency: each repeat times generate(prompt, 1) (prefill and the first pick) and
generate(prompt, 1 + steps), back to back; (second - first) / steps is one sample.
tokens/s = batch / median per-token latency. Shares: the decode steps run again under
torch.profiler, forward hooks marking each ProductKeyMemory call; memory_share is the
time inside memory layers (query, key norm, pk_topk, softmax, the bag, gate and output
projections) over the step time, lookup_share that of the pk_topk and embedding_bag ops
alone (the profiler's own cost per op inflates both a little).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, print_table, recorded_options, save_complete, save_json, spread_ms, sync  # noqa: E402

from memory_ext import ProductKeyMemory  # noqa: E402
from memory_ext.model import Decoder, DecoderConfig, memory_placement  # noqa: E402

COLUMNS = ["config", "model", "batch", "median_ms", "min_ms", "max_ms", "tokens_per_s", "prefill_ms", "memory_share",
           "lookup_share", "pk_topk_us", "bag_us"]
CONFIGS = {
    "demo": dict(vocab_size=288, dim=128, n_layers=6, n_heads=4, max_seq_len=64,
                 memory=dict(n_keys=128, heads=4, k=16)),
    "large": dict(vocab_size=32000, dim=512, n_layers=8, n_heads=8, max_seq_len=256,
                  memory=dict(n_keys=512, heads=4, k=32)),
    "quick": dict(vocab_size=64, dim=32, n_layers=3, n_heads=2, max_seq_len=32,
                  memory=dict(n_keys=16, heads=2, k=4)),
}
MEMORY_OPS = ("memory::pk_topk", "memory::embedding_bag")


def build(config: str, memory: bool, device: str) -> Decoder:
    """The dense or Memory+ decoder of a configuration, in eval mode."""
    spec = dict(CONFIGS[config])
    cfg = DecoderConfig(**{k: v for k, v in spec.items() if k != "memory"})
    if memory:
        cfg.memory_layers, cfg.memory = memory_placement(cfg.n_layers), dict(spec["memory"])
    torch.manual_seed(0)
    return Decoder(cfg).to(device).eval()


def per_token_samples_ms(model: Decoder, prompt: torch.Tensor, steps: int, device: str, warmup: int,
                         repeats: int) -> tuple[list[float], list[float]]:
    """Per-token decode latency samples and prefill (generate(prompt, 1)) samples, in ms."""
    def timed(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        model.generate(prompt, n)
        sync(device)
        return (time.perf_counter() - t0) * 1e3

    for _ in range(warmup):
        timed(1), timed(1 + steps)
    per_token, prefill = [], []
    for _ in range(repeats):
        first, full = timed(1), timed(1 + steps)
        prefill.append(first)
        per_token.append(max(full - first, 1e-6) / steps)
    return per_token, prefill


def shares(model: Decoder, prompt: torch.Tensor, steps: int, device: str) -> dict:
    """Shares of the decode steps spent in memory layers and in the lookup ops, from a profiled run."""
    hooks, contexts = [], []
    for m in model.modules():
        if isinstance(m, ProductKeyMemory):
            def enter(mod, args):
                contexts.append(record_function("memory_layer"))
                contexts[-1].__enter__()

            def leave(mod, args, out):
                contexts.pop().__exit__(None, None, None)

            hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    try:
        with torch.no_grad():
            cache = model.new_cache(prompt.shape[1] + steps)
            nxt = model(prompt, cache)[:, -1:].argmax(-1)
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    with record_function("decode_step"):
                        nxt = model(nxt, cache)[:, -1:].argmax(-1)
                    sync(device)
    finally:
        for h in hooks:
            h.remove()
    # Op times on the device for CUDA (kernels), on the CPU otherwise; the step stays a
    # CPU range, synchronised at its end, so it is the step's wall time.
    timing = "device_time_total" if device.startswith("cuda") else "cpu_time_total"
    events = prof.key_averages()
    totals = {e.key: getattr(e, timing) for e in events}
    step = next(e.cpu_time_total for e in events if e.key == "decode_step")
    lookup = sum(totals.get(op, 0.0) for op in MEMORY_OPS)
    has_memory = any(isinstance(m, ProductKeyMemory) for m in model.modules())
    layer = next((e.cpu_time_total for e in events if e.key == "memory_layer"), 0.0)
    return {
        "memory_share": layer / step if has_memory else None,
        "lookup_share": lookup / step if has_memory else None,
        "pk_topk_us": totals.get("memory::pk_topk", 0.0) / steps if has_memory else None,
        "bag_us": totals.get("memory::embedding_bag", 0.0) / steps if has_memory else None,
        "profiled_step_us": step / steps,
    }


def bench_case(config: str, name: str, model: Decoder, batch: int, args) -> dict:
    gen = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, args.prompt), generator=gen).to(args.device)
    per_token, prefill = per_token_samples_ms(model, prompt, args.steps, args.device, args.warmup, args.repeats)
    row = dict(config=config, model=name, batch=batch, prompt=args.prompt, steps=args.steps, **spread_ms(per_token),
               samples_ms=per_token, prefill_ms=statistics.median(prefill))
    row["tokens_per_s"] = batch / (row["median_ms"] * 1e-3)
    row.update(shares(model, prompt, args.steps, args.device))
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--configs", nargs="+", default=None, choices=sorted(CONFIGS), help="default: demo large")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=None, help="decode steps per timed call (default 32; --quick: 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed repeats (default 2; --quick: 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, at least 5 (default 7)")
    p.add_argument("--quick", action="store_true", help="a tiny model: a smoke run of a few seconds")
    p.add_argument("--out", default="bench/results/decode_cpu.json")
    args = p.parse_args(argv)
    args.configs = args.configs or (["quick"] if args.quick else ["demo", "large"])
    args.steps = args.steps or (4 if args.quick else 32)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.repeats = max(5, args.repeats or (5 if args.quick else 7))
    if args.quick:
        args.batches = [b for b in args.batches if b <= 2] or [1]
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(args.device)
    print(f"device {args.device} ({info.get('gpu', info['cpu'])}), threads {info['threads']}")
    payload = dict(benchmark="decode", machine=info, config=recorded_options(args), configs={c: CONFIGS[c] for c in args.configs},
                   complete=False, results=[])
    for config in args.configs:
        models = {"dense": build(config, False, args.device), "memory+": build(config, True, args.device)}
        for batch in args.batches:
            for name, model in models.items():
                if args.prompt + 1 + args.steps > model.cfg.max_seq_len:
                    raise SystemExit(f"bench_decode: prompt + 1 + steps exceeds max_seq_len {model.cfg.max_seq_len}")
                row = bench_case(config, name, model, batch, args)
                payload["results"].append(row)
                save_json(args.out, payload, quiet=True)
                print_table([row], COLUMNS)
        del models
    save_complete(args.out, payload, COLUMNS)


if __name__ == "__main__":
    main()

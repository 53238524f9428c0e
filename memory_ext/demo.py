"""What memory buys: dense vs Memory+ vs 2x-dense on synthetic factual recall.

    python -m memory_ext.demo [--device cpu] [--steps N | --seconds S] [--out DIR]

Trains three decoders from the same seed on the same data (memory_ext.facts): a dense
model, a Memory+ model of about the same FLOPs per token (three memory layers sharing one
value pool in place of FFNs, centred with a wide stride), and a dense model with twice
the layers (about twice the FLOPs). Prints exact-match accuracy and answer NLL on
questions in held-out templates (and, as "seen", the accuracy with a training question
template: facts stored, as opposed to questions understood), and writes results.json and
curves.png to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import memory_ext
from memory_ext import distributed as md
from memory_ext.facts import FactSet
from memory_ext.model import Decoder, DecoderConfig, flops_per_token, memory_placement
from memory_ext.nn import clip_grad_norms, memory_usage, param_groups, track_usage, value_parameters
from memory_ext.provenance import machine_info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m memory_ext.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=1000, help="training steps per model")
    p.add_argument("--seconds", type=float, default=None, help="also stop each model after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_out", help="folder for results.json and curves.png")
    p.add_argument("--entities", type=int, default=300, help="entities, 4 facts each")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=6, help="blocks of the dense and Memory+ models")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--n-keys", type=int, default=128, help="sub-keys per half; n_keys^2 value rows")
    p.add_argument("--mem-heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=16, help="rows read per memory head")
    p.add_argument("--memory-layers", default=None, help="blocks with memory, e.g. 1,3,5 (default: Memory+ placement)")
    p.add_argument("--no-qk-norm", dest="qk_norm", action="store_false")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--values-lr-scale", type=float, default=10.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-subset", type=int, default=512, help="questions scored during training")
    p.add_argument("--models", default="dense,memory+,dense-2x", help="comma-separated subset to train")
    p.add_argument("--memory-parallel", type=int, default=1, metavar="P",
                   help="column-shard the value table over memory groups of P ranks; launch with "
                        "torchrun --nproc-per-node N (N a multiple of P); other weights are data-parallel")
    p.add_argument("--timing-rounds", type=int, default=10, help="interleaved steps timed per model at the end")
    return p.parse_args(argv)


def build(name: str, args: argparse.Namespace, vocab_size: int) -> Decoder:
    """The three contenders; the memory model is the dense one with three FFNs swapped."""
    layers = 2 * args.layers if name == "dense-2x" else args.layers
    cfg = DecoderConfig(vocab_size, dim=args.dim, n_layers=layers, n_heads=args.heads, max_seq_len=args.seq)
    if name == "memory+":
        cfg.memory_layers = (
            tuple(int(i) for i in args.memory_layers.split(",")) if args.memory_layers else memory_placement(layers)
        )
        cfg.memory = dict(n_keys=args.n_keys, heads=args.mem_heads, k=args.topk, qk_norm=args.qk_norm)
    torch.manual_seed(args.seed)
    if name == "memory+" and args.memory_group is not None:
        # One pool for the three layers, its columns split over the memory group; average_grads
        # makes its gradient the data-parallel mean, like DDP's for every other weight.
        cfg.memory["values"] = memory_ext.MemoryValues(
            args.n_keys**2, args.dim, device=args.device, process_group=args.memory_group
        )
        cfg.memory["values"].memory_shard.average_grads = True
    model = Decoder(cfg).to(args.device)
    if args.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        md.exclude_from_ddp(model)
        model = DistributedDataParallel(model)
    return model


@torch.no_grad()
def evaluate(model: Decoder, questions: list, device: str, batch: int = 256) -> tuple[float, float]:
    """Exact match (greedy decoding == teacher-forced argmax on every answer token) and mean answer NLL."""
    model.eval()
    correct, nll = 0, 0.0
    for i in range(0, len(questions), batch):
        chunk = questions[i : i + batch]
        width = max(len(p) + len(a) for p, a in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        rows, cols, targets, owner = [], [], [], []
        for j, (p, a) in enumerate(chunk):
            tokens[j, : len(p) + len(a)] = torch.tensor(p + a)
            for m, t in enumerate(a):  # the logits at position len(p) - 1 + m predict answer token m
                rows.append(j), cols.append(len(p) - 1 + m), targets.append(t), owner.append(j)
        logits = model(tokens.to(device))[torch.tensor(rows), torch.tensor(cols)].float().cpu()
        logp = F.log_softmax(logits, dim=-1)
        targets, owner = torch.tensor(targets), torch.tensor(owner)
        hit = torch.zeros(len(chunk)).index_add_(0, owner, (logp.argmax(-1) == targets).float())
        correct += int((hit == torch.tensor([len(a) for _, a in chunk])).sum())
        nll -= logp.gather(1, targets[:, None]).sum().item()
    model.train()
    return correct / len(questions), nll / len(questions)


class Progress:
    """Plain-text progress bar on stderr: redrawn in place on a terminal, a line per evaluation otherwise."""

    def __init__(self, label: str) -> None:
        self.label, self.start, self.shown, self.tty = label, time.perf_counter(), 0.0, sys.stderr.isatty()

    def update(self, frac: float, text: str, *, new_line: bool = False) -> None:
        """Redraw at most twice a second on a terminal; elsewhere print only lines that end (new_line)."""
        now = time.perf_counter()
        if not new_line and (not self.tty or now - self.shown < 0.5):
            return
        self.shown, filled = now, int(24 * min(frac, 1.0))
        line = f"{self.label:<9} [{'#' * filled}{'.' * (24 - filled)}] {100 * min(frac, 1.0):3.0f}% {text} {now - self.start:6.1f}s"
        print(("\r" if self.tty else "") + line, end="\n" if new_line else "", file=sys.stderr, flush=True)


def train_step(model: Decoder, opt: torch.optim.Optimizer, batch: torch.Tensor, replica_group=None) -> torch.Tensor:
    """One step of next-token prediction on batch (batch, seq + 1); values and the rest clipped apart.

    With memory parallelism, sharded value slices are averaged over their replica group
    (the ranks holding the same columns) before clipping."""
    loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1).float(), batch[:, 1:].flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if replica_group is not None:
        md.sync_replica_grads(model, replica_group)
    clip_grad_norms(model, 1.0)
    opt.step()
    return loss.detach()


def train(name: str, model: Decoder, facts: FactSet, args: argparse.Namespace) -> tuple[dict, torch.optim.Optimizer]:
    """Train with AdamW (0.9, 0.95), warmup then linear decay; values at their own lr and clip."""
    opt = torch.optim.AdamW(param_groups(model, args.lr, values_lr_scale=args.values_lr_scale), betas=(0.9, 0.95))
    base = [g["lr"] for g in opt.param_groups]
    # A seeded sample: the questions come entity by entity, attribute by attribute, and a
    # stride would skip whole attributes.
    questions = facts.questions()
    picked = random.Random(args.seed).sample(range(len(questions)), min(args.eval_subset, len(questions)))
    subset = [questions[i] for i in sorted(picked)]
    batches = facts.batches(args.batch, args.seq, seed=args.seed + args.rank)  # each rank its own data
    track_usage(model)
    curve, step_times, losses = [], [], []
    bar, t0, step = Progress(name), time.perf_counter(), 0
    frac, status = 0.0, "starting"
    while frac < 1.0:
        ts = time.perf_counter()
        warm = min(1.0, (step + 1) / max(1, args.steps // 20))
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * warm * max(0.1, 1.0 - frac)
        losses.append(train_step(model, opt, next(batches).to(args.device), args.replica_group))
        step += 1
        _sync(args.device)
        step_times.append(time.perf_counter() - ts)
        elapsed = time.perf_counter() - t0
        frac = max(step / args.steps, elapsed / args.seconds if args.seconds else 0.0)
        if step % args.eval_every == 0 or frac >= 1.0:
            acc, nll = evaluate(model, subset, args.device)
            train_loss = torch.stack(losses).mean().item()
            losses = []
            point = {"step": step, "seconds": elapsed, "train_loss": train_loss, "accuracy": acc, "nll": nll}
            usage = memory_usage(model)
            if usage:
                point["rows_read"] = sum(u["rows_read"] for u in usage.values()) / len(usage)
            curve.append(point)
            status = f"step {step} loss {train_loss:.3f} acc {100 * acc:5.1f}%"
            bar.update(frac, status, new_line=not bar.tty)
        bar.update(frac, status)
    track_usage(model, enabled=False)
    acc, nll = evaluate(model, facts.questions(), args.device)
    acc_seen, _ = evaluate(model, facts.questions(held_out=False), args.device)
    bar.update(1.0, f"step {step} held-out acc {100 * acc:5.1f}% nll {nll:.3f}", new_line=True)
    steady = sorted(step_times[len(step_times) // 10 :]) or step_times
    n_values = sum(p.numel() for p in value_parameters(model))
    return {
        "params": sum(p.numel() for p in model.parameters()) - n_values,
        "memory_params": n_values,
        "flops_per_token": flops_per_token(getattr(model, "module", model), args.seq),
        "steps": step,
        "seconds": time.perf_counter() - t0,
        "step_ms_in_training": 1000 * steady[len(steady) // 2],
        "accuracy": acc,
        "nll": nll,
        "accuracy_seen_template": acc_seen,
        "memory_usage_last_window": usage,
        "curve": curve,
    }, opt


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(trained: dict, batch: torch.Tensor, device: str, rounds: int, replica_group=None) -> dict[str, float]:
    """Median ms per training step, the models taking turns, so that load from other
    processes on a shared machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in trained}
    for r in range(rounds + 1):
        for name, (model, opt) in trained.items():
            _sync(device)
            start = time.perf_counter()
            train_step(model, opt, batch, replica_group)
            _sync(device)
            if r:  # round 0 warms up
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: sorted(t)[len(t) // 2] if t else float("nan") for name, t in times.items()}


def plot(results: dict, path: Path) -> bool:
    """Learning curves (train loss, held-out accuracy) as PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        steps = [p["step"] for p in r["curve"]]
        ax1.plot(steps, [p["train_loss"] for p in r["curve"]], label=name)
        ax2.plot(steps, [100 * p["accuracy"] for p in r["curve"]], label=name)
    ax1.set(xlabel="step", ylabel="train loss", yscale="log")
    ax2.set(xlabel="step", ylabel="held-out template accuracy (%)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def summary(results: dict) -> str:
    """The table printed at the end."""
    head = (f"{'model':<9} {'params':>8} {'memory':>8} {'MFLOP/tok':>9} {'ms/step':>8} {'steps':>6} "
            f"{'accuracy':>9} {'NLL':>7} {'seen':>7}")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        lines.append(
            f"{name:<9} {r['params'] / 1e6:7.2f}M {r['memory_params'] / 1e6:7.2f}M {r['flops_per_token'] / 1e6:9.2f} "
            f"{r['step_ms']:8.1f} {r['steps']:6d} {100 * r['accuracy']:8.1f}% {r['nll']:7.3f} "
            f"{100 * r['accuracy_seen_template']:6.1f}%"
        )
    return "\n".join(lines)


def setup_parallel(args: argparse.Namespace) -> None:
    """Process groups for --memory-parallel (under torchrun); output from rank 0 only."""
    args.world, args.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    args.memory_group = args.replica_group = None
    if args.memory_parallel > 1 and args.world == 1:
        raise SystemExit("--memory-parallel P needs P processes: torchrun --nproc-per-node P -m memory_ext.demo ...")
    if args.world == 1:
        return
    import torch.distributed as dist

    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    args.memory_group, args.replica_group = md.new_memory_groups(args.memory_parallel)
    if args.rank != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    setup_parallel(args)
    facts = FactSet(args.entities, seed=args.seed)
    n_q = len(facts.questions())
    print(f"{args.entities} entities, {n_q} facts, vocabulary {len(facts.vocab)}; device {args.device}, "
          f"{torch.get_num_threads()} threads; budget {args.steps} steps"
          + (f" or {args.seconds:.0f} s" if args.seconds else "") + " per model", file=sys.stderr)
    results, trained = {}, {}
    for name in args.models.split(","):
        model = build(name, args, len(facts.vocab))
        results[name], opt = train(name, model, facts, args)
        trained[name] = (model, opt)
    # After the evaluations, so these extra steps change no reported accuracy.
    batch = next(facts.batches(args.batch, args.seq, seed=args.seed)).to(args.device)
    for name, ms in time_steps(trained, batch, args.device, args.timing_rounds, args.replica_group).items():
        results[name]["step_ms"] = ms if args.timing_rounds else results[name]["step_ms_in_training"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = summary(results)
    print(table)
    report = {
        "config": vars(args),
        "machine": machine_info(args.device),
        "questions": n_q,
        "models": results,
    }
    if {"dense", "memory+"} <= results.keys():
        report["memory_over_dense_step_time"] = results["memory+"]["step_ms"] / results["dense"]["step_ms"]
        print(f"Memory+ step time / dense step time: {report['memory_over_dense_step_time']:.2f}")
    if args.rank != 0:
        return report
    report["config"] = {k: v for k, v in vars(args).items() if not k.endswith("_group")}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    if plot(results, out / "curves.png"):
        print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")
    else:
        print(f"wrote {out / 'results.json'}; plot skipped (matplotlib is not installed)")
    return report


if __name__ == "__main__":
    main()

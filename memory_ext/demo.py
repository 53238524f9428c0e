"""What memory buys: dense vs Memory+ vs 2x-dense on synthetic factual recall.

    python -m memory_ext.demo [--device cpu] [--steps N | --seconds S] [--out DIR]
    python -m memory_ext.demo continual [...]   (new facts without forgetting: demo_continual)
    python -m memory_ext.demo seeds [...]       (the demo over several seeds: demo_seeds)
    python -m memory_ext.demo sweep [...]       (accuracy against memory size: demo_sweep)

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
import itertools
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import memory_ext
from memory_ext import distributed as md
from memory_ext.facts import PAD, SEP, FactSet
from memory_ext.model import Decoder, DecoderConfig, flops_per_token, memory_placement
from memory_ext.nn import (
    ProductKeyMemory,
    clip_grad_norms,
    memory_usage,
    param_groups,
    quantize_values,
    track_usage,
    value_optimizer,
    value_parameters,
    value_tables,
)
from memory_ext.provenance import machine_info, recorded_options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m memory_ext.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=800, help="training steps per model")
    p.add_argument("--seconds", type=float, default=None, help="also stop each model after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_out", help="folder for results.json and curves.png")
    p.add_argument("--entities", type=int, default=300, help="entities, 4 facts each")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=6, help="blocks of the dense and Memory+ models")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--n-keys", type=int, default=32, help="sub-keys per half; n_keys^2 value rows")
    p.add_argument("--mem-heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=16, help="rows read per memory head")
    p.add_argument("--memory-layers", default=None, help="blocks with memory, e.g. 1,3,5 (default: Memory+ placement)")
    p.add_argument("--no-qk-norm", dest="qk_norm", action="store_false")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--values-lr-scale", type=float, default=10.0)
    p.add_argument("--values-path", choices=("sparse", "fused", "dense"), default="fused",
                   help="how the memory values train: the row update fused into the backward (default), "
                        "sparse row gradients + a row optimizer (the same updates), or dense gradients + AdamW")
    p.add_argument("--values-optimizer", choices=("adam", "adagrad"), default="adagrad",
                   help="row optimizer of the values on the sparse and fused paths: row-wise Adagrad (default, "
                        "one float of state per row) or SparseRowAdam (lazy AdamW)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-subset", type=int, default=512, help="questions scored during training")
    p.add_argument("--models", default="dense,memory+,dense-2x", help="comma-separated subset to train")
    p.add_argument("--memory-parallel", type=int, default=1, metavar="P",
                   help="column-shard the value table over memory groups of P ranks; launch with "
                        "torchrun --nproc-per-node N (N a multiple of P); other weights are data-parallel")
    p.add_argument("--timing-rounds", type=int, default=10, help="interleaved steps timed per model at the end")
    return p.parse_args(argv)


@dataclass
class Runtime:
    """Where this process runs, set up once from the launch environment (kept apart from the CLI options)."""

    world: int = 1
    rank: int = 0
    device: str = "cpu"
    backend: str | None = None  # of the default process group; None in a one-process run
    memory_group: dist.ProcessGroup | None = None
    replica_group: dist.ProcessGroup | None = None

    def describe(self) -> dict:
        """The JSON-friendly part, for results.json."""
        return {"world": self.world, "device": self.device, "backend": self.backend}


def choose_device(
    requested: str, world: int, local_rank: int, local_world: int, n_gpus: int
) -> tuple[str, str | None, str | None]:
    """(device, process-group backend, a note for stderr or None) of one rank.

    One process keeps the requested device. Under torchrun a CUDA request gives each rank
    cuda:LOCAL_RANK and NCCL when the node has a GPU for each of its LOCAL_WORLD_SIZE
    ranks, and otherwise sends every rank to the CPU with Gloo: the choice rests on the
    node's counts, not on this rank's index, so all ranks pick the same backend.
    """
    if world == 1:
        return requested, None, None
    if not requested.startswith("cuda"):
        return requested, "gloo", None
    if local_world <= n_gpus:
        return f"cuda:{local_rank}", "nccl", None
    note = (
        f"memory_ext.demo: {local_world} ranks per node but {n_gpus} GPU(s) visible, so no GPU for each rank; "
        "all ranks run on the CPU with Gloo"
    )
    return "cpu", "gloo", note


def setup_runtime(args: argparse.Namespace) -> Runtime:
    """Device and process groups for --memory-parallel (under torchrun); output from rank 0 only."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if args.memory_parallel > 1 and world == 1:
        raise SystemExit("--memory-parallel P needs P processes: torchrun --nproc-per-node P -m memory_ext.demo ...")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    n_gpus = torch.cuda.device_count() if world > 1 and args.device.startswith("cuda") else 0
    device, backend, note = choose_device(args.device, world, local_rank, local_world, n_gpus)
    if world == 1:
        return Runtime(device=device)
    if note and rank == 0:
        print(note, file=sys.stderr, flush=True)
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    memory_group, replica_group = md.new_memory_groups(args.memory_parallel)
    if rank != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    return Runtime(world, rank, device, backend, memory_group, replica_group)


def sharded_pool(args: argparse.Namespace, run: Runtime) -> memory_ext.MemoryValues | None:
    """The Memory+ value pool with its columns split over the memory group, or None when
    the group is this rank alone: then the decoder makes its own pool, drawn as in a
    one-process run, and DDP averages its gradient like any other weight's."""
    if run.memory_group is None or dist.get_world_size(run.memory_group) == 1:
        return None
    values = memory_ext.MemoryValues(args.n_keys**2, args.dim, device=run.device, process_group=run.memory_group)
    # The sharded lookup sums the group's gradients; average_grads makes it the
    # data-parallel mean, like DDP's for every other weight.
    values.memory_shard.average_grads = True
    return values


def build(name: str, args: argparse.Namespace, run: Runtime, vocab_size: int) -> Decoder:
    """The three contenders; the memory model is the dense one with three FFNs swapped."""
    layers = 2 * args.layers if name == "dense-2x" else args.layers
    cfg = DecoderConfig(vocab_size, dim=args.dim, n_layers=layers, n_heads=args.heads, max_seq_len=args.seq)
    if name == "memory+":
        cfg.memory_layers = (
            tuple(int(i) for i in args.memory_layers.split(",")) if args.memory_layers else memory_placement(layers)
        )
        cfg.memory = dict(n_keys=args.n_keys, heads=args.mem_heads, k=args.topk, qk_norm=args.qk_norm)
    torch.manual_seed(args.seed)
    if name == "memory+":
        pool = sharded_pool(args, run)  # one pool for the three layers
        if pool is not None:
            cfg.memory["values"] = pool
    model = Decoder(cfg).to(run.device)
    if run.world > 1:
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


def generated_answers(model: Decoder, facts: FactSet, questions: list, device: str) -> list[str]:
    """The model's greedy continuation of each question prompt as words, up to the next item's
    <s> (one token more than the true answer, so an answer that goes on shows it)."""
    model = getattr(model, "module", model)  # DDP-wrapped in a multi-process run
    out = []
    for prompt, answer in questions:
        new = max(0, min(len(answer) + 1, model.cfg.max_seq_len - len(prompt)))
        ids = model.generate(torch.tensor([prompt], device=device), new)[0, len(prompt) :].tolist()
        out.append(" ".join(itertools.takewhile(lambda w: w not in (SEP, PAD), facts.decode(ids).split())) or "-")
    return out


def answer_lines(facts: FactSet, questions: list, answers: dict[str, list[str]]) -> list[str]:
    """Each question (the words between "Q :" and "A :"), then its true answer and each model's."""
    lines = []
    for i, (prompt, answer) in enumerate(questions):
        lines.append(f"  Q: {' '.join(facts.decode(prompt).split()[3:-2])}")
        lines.append("     " + " | ".join([f"true: {facts.decode(answer)}"] + [f"{n}: {a[i]}" for n, a in answers.items()]))
    return lines


def quantized_scores(model: Decoder, facts: FactSet, float_scores: dict, device: str) -> dict:
    """Held-out accuracy and answer NLL of the trained model with its value tables row-wise
    quantized for inference (uint8 codes with a scale and bias per row, float8 e4m3 codes
    with a scale), and their change from the float tables. The float tables are put back
    afterwards; {} for a model whose tables are sharded over ranks (quantized one rank at a
    time they would be another model)."""
    model = getattr(model, "module", model)
    layers = [m for m in model.modules() if isinstance(m, ProductKeyMemory)]
    if not layers or any(getattr(m.values, "sharded", False) for m in layers):
        return {}
    tables = [m.values for m in layers]
    questions, out = facts.questions(), {}
    for codes in ("uint8", "float8_e4m3fn"):
        try:
            quantize_values(model, codes)
            acc, nll = evaluate(model, questions, device)
        finally:  # back to the float tables, before the next format too
            for m, t in zip(layers, tables, strict=True):
                m.values = t
        out[codes] = {
            "accuracy": acc,
            "nll": nll,
            "accuracy_change_points": 100 * (acc - float_scores["accuracy"]),
            "nll_change": nll / float_scores["nll"] - 1,
        }
    return out


def quantized_lines(quantized: dict) -> list[str]:
    """One line per code format of quantized_scores."""
    return [
        f"Memory+ with {codes} values: held-out accuracy {100 * q['accuracy']:.1f}% "
        f"({q['accuracy_change_points']:+.1f} points), NLL {q['nll']:.3f} ({100 * q['nll_change']:+.2f}%)"
        for codes, q in quantized.items()
    ]


def eval_subset(questions: list, n: int, seed: int) -> list:
    """n questions scored during training, a seeded sample kept in order: the questions come
    entity by entity, attribute by attribute, and a stride would skip whole attributes."""
    picked = random.Random(seed).sample(range(len(questions)), min(n, len(questions)))
    return [questions[i] for i in sorted(picked)]


class Progress:
    """One model's progress on stderr: a tqdm bar over the budget on a terminal; elsewhere
    (a log file, a pipe) no bar, only a line per evaluation, so logs hold no redraws."""

    def __init__(self, name: str) -> None:
        self.name, self.start = name, time.perf_counter()
        # The size from shutil, which falls back to 80 x 24: a terminal that reports a size
        # of 0 (some pseudo-terminals) would get no bar at all from tqdm's own guess.
        cols, rows = shutil.get_terminal_size()
        self.bar = tqdm(
            total=1.0, desc=f"{name:<9}", file=sys.stderr, disable=not sys.stderr.isatty(), mininterval=0.5,
            ncols=cols, nrows=rows, bar_format="{desc} [{bar:24}] {percentage:3.0f}%{postfix} {elapsed}",
        )

    def advance(self, frac: float) -> None:
        """Move the bar to frac of the budget (redrawn at most twice a second)."""
        self.bar.update(min(frac, 1.0) - self.bar.n)

    def show(self, frac: float, status: str) -> None:
        """An evaluation's status: the bar's text on a terminal, a line of its own elsewhere."""
        if self.bar.disable:
            elapsed = time.perf_counter() - self.start
            print(f"{self.name:<9} {100 * min(frac, 1.0):3.0f}% {status} {elapsed:6.1f}s", file=sys.stderr, flush=True)
        else:
            self.bar.set_postfix_str(status)

    def close(self, status: str) -> None:
        """The final status, on the full bar or as the last line."""
        self.advance(1.0)
        self.show(1.0, status)
        self.bar.close()


class Optimizers:
    """The dense optimizer and, for a memory model on the sparse or fused path, the values'
    row optimizer, used as one (their param_groups concatenated, for the schedule)."""

    def __init__(self, *optimizers: torch.optim.Optimizer | None) -> None:
        self.optimizers = [o for o in optimizers if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()


def train_step(model: Decoder, opt: Optimizers, batch: torch.Tensor, replica_group=None) -> torch.Tensor:
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


def make_optimizer(model: Decoder, args: argparse.Namespace) -> Optimizers:
    """AdamW (0.9, 0.95) for the dense weights; the values at their own learning rate
    (param_groups), on the path --values-path picks (value_optimizer for sparse and fused,
    the fused update clipped to norm 1 in the backward as clip_grad_norms would)."""
    tables = value_tables(model)
    # A table DDP averages (an unsharded pool in a data-parallel run) must keep a dense
    # gradient: DDP's buckets cannot hold sparse ones. Sharded tables are kept out of DDP.
    under_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel) and not all(t.sharded for t in tables)
    dense_values = args.values_path == "dense" or not tables or under_ddp
    groups = param_groups(model, args.lr, values="dense" if dense_values else "sparse",
                          values_lr_scale=args.values_lr_scale)
    dense = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    if dense_values:
        return Optimizers(dense)
    fused, rule = args.values_path == "fused", args.values_optimizer
    if any(t.sharded for t in tables) and (fused or rule != "adam"):
        # Row-wise state and fused updates need whole rows, which no rank of a memory
        # group holds: the sharded table takes the sparse path with SparseRowAdam.
        print("memory parallelism: values on the sparse path with SparseRowAdam "
              f"(not --values-path {args.values_path} --values-optimizer {rule})", file=sys.stderr)
        fused, rule = False, "adam"
    values = value_optimizer(model, args.lr, rule=rule, fused=fused,
                             values_lr_scale=args.values_lr_scale, max_norm=1.0 if fused else None)
    return Optimizers(dense, values)


def set_lr(opt: torch.optim.Optimizer, base: list[float], step: int, frac: float, steps: int) -> None:
    """Linear warmup over the first 5% of the steps, then linear decay with the budget spent, to 0.1x."""
    warm = min(1.0, (step + 1) / max(1, steps // 20))
    for g, lr in zip(opt.param_groups, base, strict=True):
        g["lr"] = lr * warm * max(0.1, 1.0 - frac)


def curve_point(model: Decoder, subset: list, step: int, seconds: float, losses: list, device: str) -> tuple[dict, dict]:
    """One point of the learning curve (losses: the steps since the last point), and the
    row-usage statistics of that window, which starts a new one."""
    acc, nll = evaluate(model, subset, device)
    point = {"step": step, "seconds": seconds, "train_loss": torch.stack(losses).mean().item(), "accuracy": acc, "nll": nll}
    usage = memory_usage(model)
    if usage:
        point["rows_read"] = sum(u["rows_read"] for u in usage.values()) / len(usage)
    return point, usage


def train(
    model: Decoder, batches: Iterator[torch.Tensor], subset: list, args: argparse.Namespace, run: Runtime,
    progress: Progress,
) -> tuple[dict, Optimizers]:
    """Train until --steps or --seconds is spent, scoring subset every --eval-every steps and
    at the end; the learning curve and step times, and the optimizer."""
    opt = make_optimizer(model, args)
    base = [g["lr"] for g in opt.param_groups]
    track_usage(model)
    curve, step_times, losses, usage = [], [], [], {}
    t0, step, frac = time.perf_counter(), 0, 0.0
    while frac < 1.0:
        ts = time.perf_counter()
        set_lr(opt, base, step, frac, args.steps)
        losses.append(train_step(model, opt, next(batches).to(run.device), run.replica_group))
        step += 1
        _sync(run.device)
        step_times.append(time.perf_counter() - ts)
        elapsed = time.perf_counter() - t0
        frac = max(step / args.steps, elapsed / args.seconds if args.seconds else 0.0)
        if step % args.eval_every == 0 or frac >= 1.0:
            point, usage = curve_point(model, subset, step, elapsed, losses, run.device)
            curve.append(point)
            losses = []
            progress.show(frac, f"step {step} loss {point['train_loss']:.3f} acc {100 * point['accuracy']:5.1f}%")
        progress.advance(frac)
    track_usage(model, enabled=False)
    steady = sorted(step_times[len(step_times) // 10 :]) or step_times
    return {
        "steps": step,
        "step_ms_in_training": 1000 * steady[len(steady) // 2],
        "memory_usage_last_window": usage,
        "curve": curve,
    }, opt


def score(model: Decoder, facts: FactSet, device: str) -> dict:
    """Accuracy and NLL on every held-out question, and accuracy with a training question template."""
    acc, nll = evaluate(model, facts.questions(), device)
    acc_seen, _ = evaluate(model, facts.questions(held_out=False), device)
    return {"accuracy": acc, "nll": nll, "accuracy_seen_template": acc_seen}


def size(model: Decoder, seq_len: int) -> dict:
    """Parameters outside and inside the value tables, and forward FLOPs per token."""
    n_values = sum(p.numel() for p in value_parameters(model))
    return {
        "params": sum(p.numel() for p in model.parameters()) - n_values,
        "memory_params": n_values,
        "flops_per_token": flops_per_token(getattr(model, "module", model), seq_len),
    }


def run_model(
    name: str, facts: FactSet, subset: list, args: argparse.Namespace, run: Runtime
) -> tuple[dict, tuple[Decoder, Optimizers]]:
    """Build, train and score one contender; its results, and the model and optimizer for time_steps."""
    model = build(name, args, run, len(facts.vocab))
    progress, start = Progress(name), time.perf_counter()
    batches = facts.batches(args.batch, args.seq, seed=args.seed + run.rank)  # each rank its own data
    trained, opt = train(model, batches, subset, args, run, progress)
    scores = score(model, facts, run.device)
    progress.close(f"step {trained['steps']} held-out acc {100 * scores['accuracy']:5.1f}% nll {scores['nll']:.3f}")
    seconds = time.perf_counter() - start
    result = {**size(model, args.seq), **trained, **scores, "seconds": seconds}
    order = ("params", "memory_params", "flops_per_token", "steps", "seconds", "step_ms_in_training", "accuracy",
             "nll", "accuracy_seen_template", "memory_usage_last_window", "curve")
    return {k: result[k] for k in order}, (model, opt)


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


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["continual"]:  # the second main job: python -m memory_ext.demo continual
        from memory_ext import demo_continual

        return demo_continual.main(argv[1:])
    if argv[:1] == ["seeds"]:  # the demo over several seeds
        from memory_ext import demo_seeds

        return demo_seeds.main(argv[1:])
    if argv[:1] == ["sweep"]:  # accuracy against memory size at fixed FLOPs
        from memory_ext import demo_sweep

        return demo_sweep.main(argv[1:])
    args = parse_args(argv)
    run = setup_runtime(args)
    facts = FactSet(args.entities, seed=args.seed)
    n_q = len(facts.questions())
    print(f"{args.entities} entities, {n_q} facts, vocabulary {len(facts.vocab)}; device {run.device}, "
          f"{torch.get_num_threads()} threads; budget {args.steps} steps"
          + (f" or {args.seconds:.0f} s" if args.seconds else "") + " per model", file=sys.stderr)
    subset = eval_subset(facts.questions(), args.eval_subset, args.seed)
    results, trained = {}, {}
    for name in args.models.split(","):
        results[name], trained[name] = run_model(name, facts, subset, args, run)
    # Three held-out questions answered by generation (the KV-cache decoder), before the
    # timing steps below change the weights.
    questions = facts.questions()
    shown = [questions[i] for i in random.Random(args.seed).sample(range(n_q), min(3, n_q))]
    answers = {name: generated_answers(model, facts, shown, run.device) for name, (model, _) in trained.items()}
    if "memory+" in trained:
        results["memory+"]["quantized"] = quantized_scores(trained["memory+"][0], facts, results["memory+"], run.device)
    # After the evaluations, so these extra steps change no reported accuracy.
    batch = next(facts.batches(args.batch, args.seq, seed=args.seed)).to(run.device)
    for name, ms in time_steps(trained, batch, run.device, args.timing_rounds, run.replica_group).items():
        results[name]["step_ms"] = ms if args.timing_rounds else results[name]["step_ms_in_training"]
    print(summary(results))
    for line in quantized_lines(results.get("memory+", {}).get("quantized", {})):
        print(line)
    print("held-out questions, answers generated greedily:\n" + "\n".join(answer_lines(facts, shown, answers)))
    report = {
        "config": recorded_options(args),
        "run": run.describe(),
        "machine": machine_info(run.device),
        "questions": n_q,
        "models": results,
    }
    if {"dense", "memory+"} <= results.keys():
        report["memory_over_dense_step_time"] = results["memory+"]["step_ms"] / results["dense"]["step_ms"]
        print(f"Memory+ step time / dense step time: {report['memory_over_dense_step_time']:.2f}")
    if run.rank == 0:
        write(report, Path(args.out))
    return report


def write(report: dict, out: Path) -> None:
    """results.json and curves.png in out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    if plot(report["models"], out / "curves.png"):
        print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")
    else:
        print(f"wrote {out / 'results.json'}; plot skipped (matplotlib is not installed)")


if __name__ == "__main__":
    main()

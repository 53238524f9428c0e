"""Teaching a trained Memory+ model new facts: sparse memory finetuning against full finetuning and LoRA.

    python -m memory_ext.demo_continual [--device cpu] [--steps N] [--out DIR] [--sweep]

Pretrains a Memory+ decoder on fact set A (the recall demo's model and recipe; the
checkpoint and its background row usage are cached in --out, so a rerun skips this), then
teaches it a disjoint set B of new entities (same vocabulary, about a tenth as many
facts), from the same checkpoint and for the same number of steps, with each method:
full finetuning, LoRA on the attention and FFN projections, finetuning every memory row
read, and sparse memory finetuning (the TF-IDF top-t rows, Lin et al. 2025). Reports
new-fact accuracy on B (seen and held-out question template), retained accuracy on A and
NLL on held-out background text (A's facts asked in the held-out template); prints a
table and writes continual.json and continual.png (B accuracy against A drop over the
finetuning steps). ``--sweep`` runs sparse memory finetuning over top_t and learning
rates instead and writes sweep.json and sweep.png.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from memory_ext.continual import (
    BackgroundUsage,
    SparseMemoryFinetuner,
    add_lora,
    background_usage,
    freeze_all_but_values,
)
from memory_ext.demo import answer_lines, evaluate, generated_answers
from memory_ext.facts import FactSet
from memory_ext.model import Decoder, DecoderConfig, memory_placement
from memory_ext.nn import clip_grad_norms, param_groups
from memory_ext.provenance import machine_info, recorded_options

__all__ = ["main", "split_facts", "METHODS"]

METHODS = ("full", "lora", "memory-read", "sparse")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m memory_ext.demo_continual", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_continual_out", help="folder for the cached checkpoint and the results")
    p.add_argument("--entities", type=int, default=100, help="entities of the pretraining set A, 4 facts each")
    p.add_argument("--new-entities", type=int, default=10, help="entities of the new set B")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--n-keys", type=int, default=128, help="sub-keys per half; n_keys^2 value rows")
    p.add_argument("--mem-heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=16, help="rows read per memory head")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--background-batches", type=int, default=50, help="batches of A text for the background usage")
    p.add_argument("--steps", type=int, default=100, help="finetuning steps per method")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-subset", type=int, default=256, help="A questions scored during finetuning")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="for every method")
    p.add_argument("--lr", type=float, default=1e-3, help="dense weights in full finetuning")
    p.add_argument("--lora-lr", type=float, default=3e-3)
    p.add_argument("--values-lr", type=float, default=0.01, help="memory rows, in every method that trains them")
    p.add_argument("--top-t", type=int, default=2048, help="rows per pool per step for sparse memory finetuning")
    p.add_argument("--score", default="tfidf", choices=("tfidf", "kl"))
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--sweep", action="store_true", help="sweep top_t and values lr for sparse memory finetuning")
    p.add_argument("--sweep-top-t", default="32,128,512,2048")
    p.add_argument("--sweep-lr", default="0.01,0.03,0.1")
    return p.parse_args(argv)


def split_facts(n_old: int, n_new: int, seed: int) -> tuple[FactSet, FactSet]:
    """Two fact sets over one vocabulary: the first n_old entities (A) and the next n_new (B), disjoint."""
    both = FactSet(n_old + n_new, seed=seed)
    old, new = copy.copy(both), copy.copy(both)
    old.names, old.facts = both.names[:n_old], both.facts[:n_old]
    new.names, new.facts = both.names[n_old:], both.facts[n_old:]
    return old, new


def build(args: argparse.Namespace, vocab_size: int) -> Decoder:
    cfg = DecoderConfig(vocab_size, dim=args.dim, n_layers=args.layers, n_heads=args.heads, max_seq_len=args.seq)
    cfg.memory_layers = memory_placement(args.layers)
    cfg.memory = dict(n_keys=args.n_keys, heads=args.mem_heads, k=args.topk)
    torch.manual_seed(args.seed)
    return Decoder(cfg).to(args.device)


def lm_loss(model: Decoder, batch: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(batch[:, :-1]).flatten(0, 1).float(), batch[:, 1:].flatten())


def pretrain(args: argparse.Namespace, facts: FactSet) -> tuple[Decoder, BackgroundUsage, dict]:
    """The recall demo's recipe (AdamW 0.9/0.95, values at 10x lr, warmup then linear decay,
    separate clipping), cached in --out under a key of every setting that changes it."""
    keys = ("seed", "entities", "new_entities", "dim", "layers", "heads", "n_keys", "mem_heads", "topk", "batch", "seq",
            "pretrain_steps", "pretrain_lr", "background_batches")
    key = hashlib.sha1(json.dumps({k: getattr(args, k) for k in keys}).encode()).hexdigest()[:10]
    path = Path(args.out) / f"pretrained_{key}.pt"
    model = build(args, len(facts.vocab))
    if path.exists():
        saved = torch.load(path, map_location=args.device)
        model.load_state_dict(saved["model"])
        print(f"pretrained checkpoint loaded from {path}", file=sys.stderr)
        return model, BackgroundUsage.from_state_dict(saved["background"]).to(args.device), saved["info"]
    # Dense values, as the results in bench/results/continual_*.json were measured.
    opt = torch.optim.AdamW(param_groups(model, args.pretrain_lr, values="dense"), betas=(0.9, 0.95))
    base = [g["lr"] for g in opt.param_groups]
    batches = facts.batches(args.batch, args.seq, seed=args.seed)
    t0 = time.perf_counter()
    for step in range(args.pretrain_steps):
        frac = step / args.pretrain_steps
        warm = min(1.0, (step + 1) / max(1, args.pretrain_steps // 20))
        for g, lr in zip(opt.param_groups, base, strict=True):
            g["lr"] = lr * warm * max(0.1, 1.0 - frac)
        loss = lm_loss(model, next(batches).to(args.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norms(model, 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"pretrain step {step + 1}/{args.pretrain_steps} loss {loss.item():.3f} "
                  f"{time.perf_counter() - t0:6.1f}s", file=sys.stderr)
    seconds = time.perf_counter() - t0
    # Background: the pretraining distribution, a different shuffle from the training one.
    windows = (b[:, :-1] for b in facts.batches(args.batch, args.seq, seed=args.seed + 10_000))
    background = background_usage(model, windows, max_batches=args.background_batches)
    info = {"pretrain_seconds": seconds, "background_seconds": time.perf_counter() - t0 - seconds}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "background": background.state_dict(), "info": info}, path)
    return model, background, info


@torch.no_grad()
def text_nll(model: Decoder, sequences: list[list[int]], device: str, batch: int = 256) -> float:
    """Mean next-token NLL over every token after the first of each sequence."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(sequences), batch):
        chunk = sequences[i : i + batch]
        width = max(len(s) for s in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width - 1, dtype=torch.bool)
        for j, s in enumerate(chunk):
            tokens[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s) - 1] = True
        tokens = tokens.to(device)
        logp = F.log_softmax(model(tokens[:, :-1]).float(), dim=-1)
        nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1).cpu()
        total += nll[mask].sum().item()
        count += int(mask.sum())
    model.train()
    return total / count


class Stepper:
    """One finetuning method: its model copy and how a step updates it."""

    def __init__(self, name: str, base: Decoder, background: BackgroundUsage, args: argparse.Namespace,
                 top_t: int | None = None, values_lr: float | None = None) -> None:
        self.name, self.model = name, copy.deepcopy(base)
        values_lr = args.values_lr if values_lr is None else values_lr
        kw = dict(optimizer=args.optimizer, lr=values_lr)
        self.ft, self.opt = None, None
        if name == "full":
            self.ft = SparseMemoryFinetuner.full(self.model, background, other_lr=args.lr, **kw)
        elif name == "lora":
            params = add_lora(self.model, rank=args.lora_rank)
            self.opt = (torch.optim.Adam(params, lr=args.lora_lr) if args.optimizer == "adam"
                        else torch.optim.SGD(params, lr=args.lora_lr))
        elif name == "memory-read":
            freeze_all_but_values(self.model)
            self.ft = SparseMemoryFinetuner.all_rows_read(self.model, background, **kw)
        elif name == "sparse":
            freeze_all_but_values(self.model)
            self.ft = SparseMemoryFinetuner(self.model, background, top_t=top_t or args.top_t, score=args.score, **kw)
        else:
            raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")

    def step(self, batch: torch.Tensor) -> float:
        loss = lm_loss(self.model, batch)
        loss.backward()
        if self.ft is not None:
            self.ft.step()
            self.ft.zero_grad()
        else:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return loss.item()


def finetune(stepper: Stepper, old: FactSet, new: FactSet, subset_old: list, before: dict,
             args: argparse.Namespace, final: bool = True) -> dict:
    """Train on B's text for args.steps; curve of (B seen accuracy, A seen accuracy on a subset)."""
    model, dev = stepper.model, args.device
    new_seen = new.questions(held_out=False)
    batches = new.batches(args.batch, args.seq, seed=args.seed + 1)
    curve = [{"step": 0, "new_seen": before["new_seen"], "old_seen_subset": before["old_seen_subset"]}]
    t0, losses = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        losses.append(stepper.step(next(batches).to(dev)))
        if step % args.eval_every == 0 or step == args.steps:
            point = {"step": step, "train_loss": sum(losses) / len(losses),
                     "new_seen": evaluate(model, new_seen, dev)[0], "old_seen_subset": evaluate(model, subset_old, dev)[0]}
            losses = []
            curve.append(point)
            print(f"{stepper.name:<12} step {step:4d} loss {point['train_loss']:.3f} B seen {100 * point['new_seen']:5.1f}% "
                  f"A subset {100 * point['old_seen_subset']:5.1f}% {time.perf_counter() - t0:6.1f}s", file=sys.stderr)
    out = {"seconds": time.perf_counter() - t0, "curve": curve,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if final:
        out.update(scores(model, old, new, dev))
    else:
        out.update({"new_seen": curve[-1]["new_seen"], "old_seen_subset": curve[-1]["old_seen_subset"]})
    if stepper.ft is not None and stepper.ft.last_selected:
        out["rows_updated_last_step"] = [int(r.numel()) for r in stepper.ft.last_selected]
    return out


def scores(model: Decoder, old: FactSet, new: FactSet, device: str) -> dict:
    """Every reported number of one model."""
    new_seen, new_nll = evaluate(model, new.questions(held_out=False), device)
    new_held, _ = evaluate(model, new.questions(), device)
    old_seen, _ = evaluate(model, old.questions(held_out=False), device)
    old_held, _ = evaluate(model, old.questions(), device)
    background = [p + a for p, a in old.questions()]
    return {"new_seen": new_seen, "new_held_out": new_held, "new_answer_nll": new_nll, "old_seen": old_seen,
            "old_held_out": old_held, "background_nll": text_nll(model, background, device)}


def matched(results: dict, pretrained_old: float) -> dict:
    """A drop (seen template, on the subset) of each method at the first step its B accuracy reaches the target,
    the target being the lowest of the methods' best B accuracies (at most 80%)."""
    target = min([0.8] + [max(p["new_seen"] for p in r["curve"]) for r in results.values()])
    out = {"target_new_seen": target}
    for name, r in results.items():
        start = r["curve"][0]["old_seen_subset"]
        point = next(p for p in r["curve"] if p["new_seen"] >= target)
        out[name] = {"step": point["step"], "new_seen": point["new_seen"], "old_drop": start - point["old_seen_subset"]}
    return out


def summary(results: dict, pretrained: dict) -> str:
    head = (f"{'method':<12} {'B seen':>7} {'B held':>7} {'A seen':>7} {'A kept':>7} {'A held':>7} {'bg NLL':>7} "
            f"{'trainable':>10} {'s':>6}")
    lines = [head, "-" * len(head),
             f"{'pretrained':<12} {100 * pretrained['new_seen']:6.1f}% {100 * pretrained['new_held_out']:6.1f}% "
             f"{100 * pretrained['old_seen']:6.1f}% {100.0:6.1f}% {100 * pretrained['old_held_out']:6.1f}% "
             f"{pretrained['background_nll']:7.3f}"]
    for name, r in results.items():
        # The share of A kept is undefined when the pretrained model answered nothing on A.
        kept = f"{100 * r['old_seen'] / pretrained['old_seen']:6.1f}%" if pretrained["old_seen"] > 0 else f"{'-':>7}"
        lines.append(f"{name:<12} {100 * r['new_seen']:6.1f}% {100 * r['new_held_out']:6.1f}% {100 * r['old_seen']:6.1f}% "
                     f"{kept} {100 * r['old_held_out']:6.1f}% {r['background_nll']:7.3f} "
                     f"{r['trainable_params']:10d} {r['seconds']:6.1f}")
    return "\n".join(lines)


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(results: dict, path: Path, title: str) -> bool:
    """B accuracy (learning) against A drop (forgetting) over the steps, one curve per method."""
    plt = _plt()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, r in results.items():
        start = r["curve"][0]["old_seen_subset"]
        ax.plot([100 * (start - p["old_seen_subset"]) for p in r["curve"]], [100 * p["new_seen"] for p in r["curve"]],
                marker=".", label=name)
    ax.set(xlabel="drop in A accuracy, seen template (points)", ylabel="B accuracy, seen template (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_sweep(points: list, refs: dict, path: Path, title: str) -> bool:
    plt = _plt()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for t in sorted({p["top_t"] for p in points}):
        mine = sorted((p for p in points if p["top_t"] == t), key=lambda p: p["values_lr"])
        ax.plot([100 * p["old_drop"] for p in mine], [100 * p["new_seen"] for p in mine], marker="o", label=f"top_t {t}")
        for p in mine:
            ax.annotate(f"{p['values_lr']:g}", (100 * p["old_drop"], 100 * p["new_seen"]), fontsize=7)
    for name, r in refs.items():
        ax.scatter([100 * r["old_drop"]], [100 * r["new_seen"]], marker="x", s=60, label=name)
    ax.set(xlabel="drop in A accuracy, seen template (points)", ylabel="B accuracy, seen template (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    old, new = split_facts(args.entities, args.new_entities, args.seed)
    print(f"A: {len(old.questions())} facts, B: {len(new.questions())} new facts; device {args.device}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    base, background, info = pretrain(args, old)
    pretrained = scores(base, old, new, args.device)
    questions = old.questions(held_out=False)
    picked = random.Random(args.seed).sample(range(len(questions)), min(args.eval_subset, len(questions)))
    subset_old = [questions[i] for i in sorted(picked)]
    before = {"new_seen": pretrained["new_seen"], "old_seen_subset": evaluate(base, subset_old, args.device)[0]}
    report = {"machine": machine_info(args.device), "config": recorded_options(args), "pretrain": info, "pretrained": pretrained,
              "facts": {"old": len(old.questions()), "new": len(new.questions())}}
    if args.sweep:
        points = []
        for t in (int(x) for x in args.sweep_top_t.split(",")):
            for lr in (float(x) for x in args.sweep_lr.split(",")):
                stepper = Stepper("sparse", base, background, args, top_t=t, values_lr=lr)
                stepper.name = f"t={t} lr={lr:g}"
                r = finetune(stepper, old, new, subset_old, before, args, final=False)
                points.append({"top_t": t, "values_lr": lr, "new_seen": r["new_seen"],
                               "old_drop": before["old_seen_subset"] - r["old_seen_subset"], "curve": r["curve"]})
        refs = {}
        for name in ("full", "lora"):
            r = finetune(Stepper(name, base, background, args), old, new, subset_old, before, args, final=False)
            refs[name] = {"new_seen": r["new_seen"], "old_drop": before["old_seen_subset"] - r["old_seen_subset"]}
        report.update(sweep=points, references=refs, total_seconds=time.perf_counter() - t_start)
        (out / "sweep.json").write_text(json.dumps(report, indent=1))
        drew = plot_sweep(points, refs, out / "sweep.png", f"sparse memory finetuning, {args.steps} steps, seed {args.seed}")
        for p in points:
            print(f"top_t {p['top_t']:5d} lr {p['values_lr']:<7g} B seen {100 * p['new_seen']:5.1f}% "
                  f"A drop {100 * p['old_drop']:5.1f} points")
        print(f"wrote {out / 'sweep.json'}" + (f" and {out / 'sweep.png'}" if drew else ""))
        return report
    results = {}
    # Two of the new facts (seen template), answered by generation: the pretrained model,
    # then each method's finetuned copy, dropped once it has answered.
    new_questions = new.questions(held_out=False)
    shown = [new_questions[i] for i in random.Random(args.seed).sample(range(len(new_questions)), min(2, len(new_questions)))]
    answers = {"pretrained": generated_answers(base, new, shown, args.device)}
    for name in args.methods.split(","):
        stepper = Stepper(name, base, background, args)
        results[name] = finetune(stepper, old, new, subset_old, before, args)
        answers[name] = generated_answers(stepper.model, new, shown, args.device)
    report["methods"] = results
    report["matched"] = matched(results, before["old_seen_subset"])
    report["total_seconds"] = time.perf_counter() - t_start
    print(summary(results, pretrained))
    print("new facts, answers generated greedily:\n" + "\n".join(answer_lines(new, shown, answers)))
    m = report["matched"]
    print(f"at B seen accuracy >= {100 * m['target_new_seen']:.1f}%: "
          + ", ".join(f"{k} A drop {100 * v['old_drop']:.1f} points (step {v['step']})"
                      for k, v in m.items() if k != "target_new_seen"))
    (out / "continual.json").write_text(json.dumps(report, indent=1))
    drew = plot(results, out / "continual.png", f"learning B vs forgetting A, seed {args.seed}")
    print(f"wrote {out / 'continual.json'}" + (f" and {out / 'continual.png'}" if drew else " (plot skipped: no matplotlib)"))
    print(f"total {report['total_seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()

"""Job of the demo's data-parallel test: two ranks train the demo's Memory+ model, each on its
own batches, and one process trains the same model on both ranks' batches at once.

With plain data parallelism (memory parallel 1) the value pool is an ordinary DDP weight
(dense gradient); with memory parallel 2 it is column-sharded over both ranks (sparse path) (loaded from the one-process
model's table, since the sharded table draws its columns differently). Either way the
ranks' mean loss must equal the one-process loss at every step: DDP and the sharded
lookup average the gradients over the ranks, and the global-batch loss is the mean of
the ranks' losses. (Adam and the clipping hide a wrong scale of the value gradient, sum
for mean; dist_model_job.py checks that scale with SGD.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from memory_ext import demo
from memory_ext import distributed as md
from memory_ext.facts import FactSet

from dist_harness import case

ARGS = ["--steps", "4", "--entities", "12", "--dim", "32", "--layers", "3", "--heads", "2", "--n-keys", "8",
        "--mem-heads", "2", "--topk", "4", "--batch", "2", "--seq", "16", "--eval-every", "1", "--eval-subset", "8",
        "--models", "memory+"]


def _global_batches(facts: FactSet, args, world: int):
    """Every rank's batch of a step, stacked: what the ranks see together."""
    streams = [facts.batches(args.batch, args.seq, seed=args.seed + r) for r in range(world)]
    while True:
        yield torch.cat([next(s) for s in streams])


def demo_job(rank, world, results):
    for memory_parallel in (1, 2):
        # The same values path on both sides: DDP averages an unsharded pool's dense gradient;
        # a sharded pool takes the sparse path with SparseRowAdam.
        path = ["--values-path", "dense"] if memory_parallel == 1 else ["--values-path", "sparse", "--values-optimizer", "adam"]
        args = demo.parse_args(ARGS + path + ["--device", "cpu", "--memory-parallel", str(memory_parallel)])
        facts = FactSet(args.entities, seed=args.seed)
        subset = demo.eval_subset(facts.questions(), args.eval_subset, args.seed)
        memory_group, replica_group = md.new_memory_groups(memory_parallel)
        run = demo.Runtime(world, rank, "cpu", "gloo", memory_group, replica_group)
        with case(results, f"demo/memory_parallel_{memory_parallel}"):
            one = demo.Runtime()
            reference = demo.build("memory+", args, one, len(facts.vocab))
            model = demo.build("memory+", args, run, len(facts.vocab))
            assert md.is_sharded(model.module.layers[1].ffn.values) == (memory_parallel > 1)
            if memory_parallel > 1:
                model.module.load_state_dict(reference.state_dict())  # the full table is split on load
            mine, _ = demo.train(
                model, facts.batches(args.batch, args.seq, seed=args.seed + rank), subset, args, run,
                demo.Progress("memory+"),
            )
            want, _ = demo.train(reference, _global_batches(facts, args, world), subset, args, one,
                                 demo.Progress("reference"))
            losses = torch.tensor([p["train_loss"] for p in mine["curve"]], dtype=torch.float64)
            dist.all_reduce(losses)
            losses /= world
            want_losses = torch.tensor([p["train_loss"] for p in want["curve"]], dtype=torch.float64)
            assert mine["steps"] == want["steps"] == args.steps
            torch.testing.assert_close(losses, want_losses, rtol=1e-4, atol=1e-5)
            assert want_losses[-1] < want_losses[0] - 0.1, f"the model did not train: {want_losses}"
            nll = torch.tensor([p["nll"] for p in mine["curve"]], dtype=torch.float64)
            torch.testing.assert_close(nll, torch.tensor([p["nll"] for p in want["curve"]], dtype=torch.float64),
                                       rtol=1e-4, atol=1e-5)

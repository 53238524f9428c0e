"""Sparse memory finetuning: teach a trained model new facts by updating only the memory rows they use.

Lin et al., "Continual Learning via Sparse Memory Finetuning" (2025): the rows of a value
pool that new data reads much more often than pretraining-like data did hold what is
specific to the new data; updating only those rows (and no other parameter) learns it
while leaving the rest of the model, and so most of what it knew, unchanged.

* :func:`background_usage` counts, per pool, how often each row is read over background
  data and in how many batches (document frequency); saveable, so it is computed once.
* :class:`SparseMemoryFinetuner` ranks the rows read since its last ``step()`` by TF-IDF
  (or KL) against the background, keeps the ``top_t`` best per pool and applies SGD or
  lazy Adam to those rows only. ``top_t=None`` updates every row read (no ranking) and
  ``other_params=True`` trains every other parameter too (full finetuning), so baselines
  share the same optimizer code.
* :func:`freeze_all_but_values` and :func:`add_lora` set a model up for those runs.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from memory_ext import ops
from memory_ext.nn.sparse_adam import coalesced
from memory_ext.nn.values import MemoryValues

__all__ = [
    "BackgroundUsage",
    "background_usage",
    "SparseMemoryFinetuner",
    "memory_pools",
    "freeze_all_but_values",
    "LoRALinear",
    "add_lora",
    "tfidf_scores",
    "kl_scores",
]


def memory_pools(model: nn.Module) -> list[tuple[str, MemoryValues]]:
    """(name, pool) for every MemoryValues of model, a shared pool once (under its first name)."""
    pools = [(name, m) for name, m in model.named_modules() if isinstance(m, MemoryValues)]
    if not pools:
        raise ValueError("memory_ext.continual: the model has no memory layers (no MemoryValues module)")
    for name, m in pools:
        if m.sharded:
            raise ValueError(f"memory_ext.continual: pool {name!r} is sharded over a process group; not supported")
    return pools


class _ReadCounter:
    """Forward pre-hooks on each pool adding the indices it is asked for to an int64 count per pool.

    The hook sees the indices however the layer chose them, and a pool shared by several
    layers gets every layer's reads. Counting stays on the pools' device (index_add_)."""

    def __init__(self, pools: list[tuple[str, MemoryValues]], *, only_with_grad: bool = False) -> None:
        self.counts = [torch.zeros(m.n_rows, dtype=torch.int64, device=m.weight.device) for _, m in pools]
        self.only_with_grad = only_with_grad
        self.handles = [m.register_forward_pre_hook(self._hook(i)) for i, (_, m) in enumerate(pools)]

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if self.only_with_grad and not torch.is_grad_enabled():
                return  # evaluation in between steps reads rows that are not being trained
            idx = args[0].reshape(-1).to(device=self.counts[i].device, dtype=torch.int64)
            self.counts[i].index_add_(0, idx, torch.ones((), dtype=torch.int64, device=idx.device).expand(idx.numel()))

        return hook

    def reset(self) -> None:
        for c in self.counts:
            c.zero_()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class BackgroundUsage:
    """Row reads per pool over background data: ``counts[i]`` (total reads of each row),
    ``doc_freq[i]`` (batches that read each row), ``n_batches``; int64 tensors of n_rows."""

    def __init__(self, names: list[str], counts: list[Tensor], doc_freq: list[Tensor], n_batches: int) -> None:
        self.names, self.counts, self.doc_freq, self.n_batches = list(names), list(counts), list(doc_freq), int(n_batches)

    @property
    def n_rows(self) -> list[int]:
        return [c.numel() for c in self.counts]

    def state_dict(self) -> dict:
        return {"names": list(self.names), "counts": [c.cpu() for c in self.counts],
                "doc_freq": [d.cpu() for d in self.doc_freq], "n_batches": self.n_batches}

    def load_state_dict(self, state: dict) -> None:
        """Replace this background by a saved one (counts stay on this object's devices when it has any)."""
        devices = [c.device for c in self.counts] if len(self.counts) == len(state["counts"]) else None
        self.names, self.n_batches = list(state["names"]), int(state["n_batches"])
        self.counts = [c.to(devices[i] if devices else c.device, torch.int64) for i, c in enumerate(state["counts"])]
        self.doc_freq = [d.to(devices[i] if devices else d.device, torch.int64) for i, d in enumerate(state["doc_freq"])]

    @classmethod
    def from_state_dict(cls, state: dict) -> BackgroundUsage:
        out = cls([], [], [], 0)
        out.load_state_dict(state)
        return out

    def to(self, device: torch.device | str) -> BackgroundUsage:
        return BackgroundUsage(self.names, [c.to(device) for c in self.counts], [d.to(device) for d in self.doc_freq],
                               self.n_batches)

    def check(self, model: nn.Module) -> list[tuple[str, MemoryValues]]:
        """The model's pools, after checking that this background was computed for a model of that shape."""
        pools = memory_pools(model)
        rows = [m.n_rows for _, m in pools]
        if rows != self.n_rows:
            raise ValueError(
                f"memory_ext.continual: background computed for pools of {self.n_rows} rows, "
                f"the model has pools of {rows} rows (a background of another model)"
            )
        return pools

    def __repr__(self) -> str:
        return f"BackgroundUsage(pools={self.names}, rows={self.n_rows}, n_batches={self.n_batches})"


@torch.no_grad()
def background_usage(model: nn.Module, batches: Iterable[Tensor], *, max_batches: int | None = None) -> BackgroundUsage:
    """Run model (no grad, eval mode) on each (batch, seq) token tensor and count row reads per pool.

    Counts and document frequencies accumulate on the device: no host sync per batch."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"background_usage: max_batches must be >= 1, got {max_batches}")
    pools = memory_pools(model)
    counter = _ReadCounter(pools)
    device = next(model.parameters()).device
    doc_freq = [torch.zeros_like(c) for c in counter.counts]
    totals = [torch.zeros_like(c) for c in counter.counts]
    was_training, n = model.training, 0
    model.eval()
    try:
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            counter.reset()
            model(batch.to(device))
            for c, d, t in zip(counter.counts, doc_freq, totals, strict=True):
                d += c > 0
                t += c
            n += 1
    finally:
        counter.remove()
        model.train(was_training)
    if n == 0:
        raise ValueError("background_usage: no batches")
    return BackgroundUsage([name for name, _ in pools], totals, doc_freq, n)


def tfidf_scores(batch_counts: Tensor, doc_freq: Tensor, n_batches: int) -> Tensor:
    """TF-IDF of each row: tf = reads / total reads in the batch, idf = log((N + 1) / (df + 1)).

    Rows not read in the batch score -inf, so they are never selected. (n_rows,) float64."""
    tf = batch_counts.double() / batch_counts.sum().clamp(min=1)
    idf = torch.log((n_batches + 1.0) / (doc_freq.double() + 1.0))
    return torch.where(batch_counts > 0, tf * idf, -math.inf)


def kl_scores(batch_counts: Tensor, background_counts: Tensor) -> Tensor:
    """Each row's term of KL(batch usage || background usage), the background smoothed by one read per row.

    Rows not read in the batch score -inf. (n_rows,) float64."""
    p = batch_counts.double() / batch_counts.sum().clamp(min=1)
    q = (background_counts.double() + 1.0) / (background_counts.sum().double() + background_counts.numel())
    return torch.where(batch_counts > 0, torch.xlogy(p, p) - p * torch.log(q), -math.inf)


class SparseMemoryFinetuner:
    """Finetune only the top_t memory rows per pool that the current data reads more than the background.

    Use: ``loss.backward(); ft.step(); ft.zero_grad()``. The rows counted are those read
    by forwards run with grad enabled since the last ``step()`` (so several backward
    passes accumulate); evaluation under ``torch.no_grad()`` does not count. ``step()``
    scores them ("tfidf" or "kl"), keeps the ``top_t`` best per pool (``None``: every row
    read, no ranking) and updates those rows with SGD or lazy Adam (moments kept for
    rows when they are selected; no weight decay). Other rows and, unless
    ``other_params``, every other parameter are left bitwise unchanged. With
    ``other_params=True`` the remaining trainable parameters are updated with the same
    kind of optimizer at ``other_lr`` (full finetuning). Gradients are read from dense
    or sparse (``MemoryValues(sparse_grad=True)``) tables alike.
    """

    def __init__(
        self,
        model: nn.Module,
        background: BackgroundUsage | None,
        *,
        top_t: int | None = 500,
        lr: float = 1.0,
        optimizer: str = "sgd",
        score: str = "tfidf",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        other_params: bool = False,
        other_lr: float | None = None,
    ) -> None:
        if top_t is not None and (not isinstance(top_t, int) or top_t < 1):
            raise ValueError(f"SparseMemoryFinetuner: top_t must be an int >= 1 or None (every row read), got {top_t!r}")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"SparseMemoryFinetuner: unknown optimizer {optimizer!r}; expected 'sgd' or 'adam'")
        if score not in ("tfidf", "kl"):
            raise ValueError(f"SparseMemoryFinetuner: unknown score {score!r}; expected 'tfidf' or 'kl'")
        if lr < 0:
            raise ValueError(f"SparseMemoryFinetuner: lr must be >= 0, got {lr}")
        if background is None:
            if top_t is not None:
                raise ValueError("SparseMemoryFinetuner: ranking rows (top_t not None) needs a background")
            self.pools = memory_pools(model)
        else:
            self.pools = background.check(model)
            device = self.pools[0][1].weight.device
            background = background.to(device)
        self.model, self.background = model, background
        self.top_t, self.lr, self.optimizer, self.score = top_t, lr, optimizer, score
        self.betas, self.eps = betas, eps
        self.steps = 0
        self.state: list[dict[str, Tensor]] = [{} for _ in self.pools]
        self._counter = _ReadCounter(self.pools, only_with_grad=True)
        self.last_selected: list[Tensor] = []
        value_ids = {id(m.weight) for _, m in self.pools}
        self.others = [p for p in model.parameters() if id(p) not in value_ids and p.requires_grad] if other_params else []
        self.other_opt: torch.optim.Optimizer | None = None
        if self.others:
            olr = lr if other_lr is None else other_lr
            self.other_opt = (
                torch.optim.SGD(self.others, lr=olr) if optimizer == "sgd"
                else torch.optim.Adam(self.others, lr=olr, betas=betas, eps=eps)
            )

    @classmethod
    def all_rows_read(cls, model: nn.Module, background: BackgroundUsage | None = None, **kwargs) -> SparseMemoryFinetuner:
        """Baseline: every memory row read is updated (no ranking), nothing else."""
        return cls(model, background, top_t=None, **kwargs)

    @classmethod
    def full(cls, model: nn.Module, background: BackgroundUsage | None = None, **kwargs) -> SparseMemoryFinetuner:
        """Baseline: full finetuning; every row read and every other trainable parameter is updated."""
        return cls(model, background, top_t=None, other_params=True, **kwargs)

    def scores(self, i: int) -> Tensor:
        """Scores of pool i's rows for the reads counted since the last step (-inf for rows not read)."""
        counts = self._counter.counts[i]
        if self.background is None:
            return torch.where(counts > 0, counts.double(), -math.inf)
        if self.score == "tfidf":
            return tfidf_scores(counts, self.background.doc_freq[i], self.background.n_batches)
        return kl_scores(counts, self.background.counts[i])

    def select(self, i: int) -> Tensor:
        """Rows of pool i to update this step: the top_t best scores among the rows read, ascending."""
        s = self.scores(i)
        if self.top_t is None:
            rows = torch.nonzero(s > -math.inf).flatten()
        else:
            # Ties broken towards the lower row (stable), so selection is deterministic.
            order = torch.sort(s, descending=True, stable=True).indices[: self.top_t]
            rows = order[s[order] > -math.inf]
        return rows.sort().values

    @staticmethod
    def _rows_grad(weight: Tensor, rows: Tensor) -> Tensor:
        """The gradient of the given rows of weight (zero for rows the gradient lacks)."""
        g = weight.grad
        if g is None:
            return torch.zeros(rows.numel(), weight.shape[1], dtype=weight.dtype, device=weight.device)
        if not g.is_sparse:
            return g.index_select(0, rows)
        g = coalesced(g)
        where = torch.full((weight.shape[0],), -1, dtype=torch.int64, device=weight.device)
        where[g.indices()[0]] = torch.arange(g.indices().shape[1], device=weight.device)
        pos = where[rows]
        vals = g.values().index_select(0, pos.clamp(min=0))
        return torch.where((pos >= 0)[:, None], vals, torch.zeros((), dtype=vals.dtype, device=vals.device))

    @torch.no_grad()
    def step(self) -> list[Tensor]:
        """Update the selected rows (and other parameters for full finetuning); returns the rows per pool."""
        self.steps += 1
        selected = []
        for i, (_, pool) in enumerate(self.pools):
            w = pool.weight
            rows = self.select(i)
            selected.append(rows)
            if rows.numel() == 0:
                continue
            grad = self._rows_grad(w, rows).to(w.dtype)
            if self.optimizer == "sgd":
                w.index_copy_(0, rows, w.index_select(0, rows) - self.lr * grad)
            else:
                st = self.state[i]
                if not st:
                    mdtype = torch.float64 if w.dtype == torch.float64 else torch.float32
                    st["exp_avg"] = torch.zeros(w.shape, dtype=mdtype, device=w.device)
                    st["exp_avg_sq"] = torch.zeros(w.shape, dtype=mdtype, device=w.device)
                ops.row_adam_(w, st["exp_avg"], st["exp_avg_sq"], rows, grad, lr=self.lr, beta1=self.betas[0],
                              beta2=self.betas[1], eps=self.eps, weight_decay=0.0, step=self.steps)
        if self.other_opt is not None:
            self.other_opt.step()
        self._counter.reset()
        self.last_selected = selected
        return selected

    def zero_grad(self) -> None:
        """Drop the gradients of the pools and of the model's other parameters."""
        for p in self.model.parameters():
            p.grad = None

    def close(self) -> None:
        """Remove the read-counting hooks from the model."""
        self._counter.remove()

    def state_dict(self) -> dict:
        return {"steps": self.steps, "state": [{k: v.cpu() for k, v in s.items()} for s in self.state],
                "other_opt": self.other_opt.state_dict() if self.other_opt else None}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.state = [{k: v.to(m.weight.device) for k, v in s.items()} for s, (_, m) in zip(state["state"], self.pools, strict=True)]
        if self.other_opt is not None and state["other_opt"] is not None:
            self.other_opt.load_state_dict(state["other_opt"])


def freeze_all_but_values(model: nn.Module) -> list[nn.Parameter]:
    """requires_grad=False on every parameter but the memory value tables; returns the tables (each once)."""
    tables = [m.weight for _, m in memory_pools(model)]
    keep = {id(p) for p in tables}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return tables


class LoRALinear(nn.Module):
    """base(x) + (alpha / rank) * B A x with the base frozen; B starts at zero, so the output starts unchanged."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRALinear: rank must be >= 1, got {rank}")
        self.base, self.rank, self.scale = base, rank, alpha / rank
        base.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}"


def add_lora(
    model: nn.Module, targets: tuple[str, ...] = ("qkv", "proj", "w1", "w2", "w3"), *, rank: int = 8, alpha: float = 16.0
) -> list[nn.Parameter]:
    """Freeze model and wrap every nn.Linear whose attribute name is in targets (by default the
    Decoder's attention and FFN projections, not the memory layers') in a LoRALinear; returns
    the LoRA parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank, alpha)
                setattr(parent, name, lora)
                wrapped.append(lora)
    if not wrapped:
        raise ValueError(f"add_lora: no nn.Linear named one of {targets} in the model")
    return [p for m in wrapped for p in (m.lora_a, m.lora_b)]

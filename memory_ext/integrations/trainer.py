"""The value-table half of the training recipe under ``transformers.Trainer``.

Trainer steps one optimizer: give it ``AdamW(param_groups(model, lr))`` through
``optimizers=`` and this callback the ``value_optimizer(model, lr, ...)``. The callback keeps
the values on the dense optimizer's schedule (at their own ``values_lr_scale``), steps them
after the dense step on the sparse path (on the fused path their backward did), and can clip
the value and other gradients separately as the recipe does (``max_norm``, with Trainer's
own ``max_grad_norm`` set to 0, which would otherwise clip all gradients as one).
"""
from __future__ import annotations

import transformers

from memory_ext.nn import RowOptimizer, clip_grad_norms, value_tables
from memory_ext.nn.row_optimizer import check_row_optimizer

__all__ = ["MemoryValuesCallback"]


class MemoryValuesCallback(transformers.TrainerCallback):
    """Steps ``values_optimizer`` (a RowOptimizer) with Trainer's steps and learning-rate schedule."""

    def __init__(self, values_optimizer: RowOptimizer, *, max_norm: float | None = None) -> None:
        check_row_optimizer("MemoryValuesCallback", values_optimizer, max_norm)
        self.values_optimizer, self.max_norm = values_optimizer, max_norm
        self._base: tuple[float, list[float]] | None = None  # dense base lr, values' base lrs

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        fused = [t for t in value_tables(model) if t.fused is not None and t.fused.optimizer is self.values_optimizer]
        if fused and args.gradient_accumulation_steps > 1:
            raise ValueError(
                "MemoryValuesCallback: a fused table is updated at every backward pass, so with "
                f"gradient_accumulation_steps={args.gradient_accumulation_steps} it would take that many steps per "
                "Trainer step; use the sparse path (value_optimizer(model, lr) without fused=True)"
            )
        if self.max_norm is not None and args.max_grad_norm > 0:
            raise ValueError(
                f"MemoryValuesCallback: max_norm={self.max_norm} clips values and other gradients separately, but "
                f"Trainer's max_grad_norm={args.max_grad_norm} would clip them together first; set max_grad_norm=0"
            )
        first = optimizer.param_groups[0]
        # LambdaLR keeps the unscheduled rate as initial_lr; without a scheduler lr is it.
        self._base = (first.get("initial_lr", first["lr"]), [g["lr"] for g in self.values_optimizer.param_groups])

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        # Set before the backward: a fused table is updated there, with this step's rate.
        dense_base, values_base = self._base
        factor = optimizer.param_groups[0]["lr"] / dense_base if dense_base else 0.0
        for group, lr in zip(self.values_optimizer.param_groups, values_base, strict=True):
            group["lr"] = lr * factor

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.max_norm is not None:
            clip_grad_norms(model, self.max_norm)

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Trainer zeroes gradients (model.zero_grad) right after: step the values before.
        self.values_optimizer.step()

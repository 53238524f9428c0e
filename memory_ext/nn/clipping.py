"""The arithmetic of gradient clipping, shared by clip_grad_norms and fused tables, so that
clipping before a fused update is bitwise the clipping of the unfused path."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["square_norm", "clip_coefficient", "scale_to_norm_"]


def square_norm(grads: list[Tensor]) -> Tensor:
    """Sum of squares of grads (a sparse one: of its stored values), float32 0-d (a CPU 0 when empty)."""
    total = torch.zeros((), dtype=torch.float32)
    for g in grads:
        total = torch.linalg.vector_norm(g._values() if g.is_sparse else g, dtype=torch.float32).square() + total
    return total


def clip_coefficient(norm: Tensor, max_norm: float) -> Tensor:
    """The factor that brings a gradient of norm ``norm`` to at most max_norm (0-d, never above 1)."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def scale_to_norm_(grads: list[Tensor], norm: Tensor, max_norm: float) -> None:
    """Scale grads in place so that their joint norm ``norm`` becomes at most max_norm."""
    coef = clip_coefficient(norm, max_norm)
    for g in grads:
        g.mul_(coef)  # a 0-d factor keeps each grad's dtype

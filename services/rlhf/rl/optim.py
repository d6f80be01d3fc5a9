"""The optimizer's pieces every trainer shares: AdamW parameter groups, the learning-rate schedule, gradient
clipping. No I/O; plain values in, torch objects out."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch

Schedule = Literal["constant", "linear", "cosine"]


def weight_decay_groups(parameters: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW parameter groups of the trainable ``parameters``: weight decay on matrices, none on biases and
    norm weights (1-D tensors)."""
    params = [p for p in parameters if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, kind: Schedule, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_steps``, then constant, linear or cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "constant":
            return 1.0
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def grad_norm(params: Iterable[torch.Tensor], max_grad_norm: float) -> torch.Tensor:
    """The global norm of the gradients of ``params`` (0-d), clipped to ``max_grad_norm`` when it is > 0; the
    norm is the one before clipping. Parameters without a gradient are left out."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_grad_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    return torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))

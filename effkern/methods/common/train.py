"""Training pieces every method shares: the warm-up + cosine schedule and accuracy metrics."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  floor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's LambdaLR with a linear warm-up over ``warmup_steps`` steps, then a cosine decay to ``floor`` times the
    base rate at ``total_steps``. The factor is a pure function of the step, so a resumed run (the scheduler's
    state_dict restored) continues exactly."""
    if total_steps < 1 or warmup_steps < 0 or not 0 <= floor <= 1:
        raise ValueError(f"total_steps must be >= 1, warmup_steps >= 0 and floor in [0, 1], got {total_steps}, "
                         f"{warmup_steps}, {floor}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of ``logits [..., N, C]`` against ``labels [N]``: a tensor of the leading dims (e.g. one value
    per side network of ``[K, N, C]``)."""
    return (logits.argmax(-1) == labels).double().mean(-1)


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Accuracy of each class ``[C]`` (NaN for a class with no sample): the long-tail metrics' building block."""
    hit = (logits.argmax(-1) == labels).double()
    count = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, hit)
    return correct / count

"""AdamW with the usual exclusions, and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:  # type: ignore[type-arg]
    """Weight decay on matrices only: never on biases, norm scales or other 1-D tensors."""
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.dim() >= 2 and "norm" not in name else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(module: nn.Module, lr: float, weight_decay: float, beta1: float, beta2: float,
                    eps: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(module, weight_decay), lr=lr, betas=(beta1, beta2), eps=eps)


def schedule_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warmup, then
    linear or cosine decay to ``min_ratio``, or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}")

"""AdamW with the usual exclusions, and learning-rate schedules."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_depth(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise LR decay: embeddings 0, block i -> i + 1,
    everything above the blocks (final norm, pooler, heads) num_layers + 1."""
    found = _LAYER.search(name)
    if found:
        return int(found.group(1)) + 1
    if "embed" in name:
        return 0
    return num_layers + 1


def parameter_groups(module: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                     head_scale: float = 1.0) -> list[dict]:  # type: ignore[type-arg]
    """Weight decay on matrices only: never on biases, norm scales or other 1-D tensors.
    With ``layer_decay`` < 1, each depth gets its own groups whose ``lr_scale`` is
    layer_decay^(top - depth): the head learns at the full rate, embeddings the slowest.
    A task head's parameters (``head.*``) get ``head_scale`` times the top rate."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    blocks = {int(m.group(1)) for m in map(_LAYER.search, names) if m}
    top = (max(blocks) + 1 if blocks else 0) + 1
    groups: dict[tuple[bool, int], dict] = {}  # type: ignore[type-arg]
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        decays = parameter.dim() >= 2 and "norm" not in name
        head = head_scale != 1.0 and name.startswith("head.")
        depth = top + 1 if head else layer_depth(name, top - 1) if layer_decay < 1 else top
        scale = head_scale if head else layer_decay ** (top - depth)
        group = groups.setdefault((decays, depth), {"params": [], "weight_decay": weight_decay if decays else 0.0,
                                                    "lr_scale": scale})
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[1], not k[0]))]


def build_optimizer(module: nn.Module, lr: float, weight_decay: float, beta1: float, beta2: float,
                    eps: float, layer_decay: float = 1.0, head_lr: float | None = None) -> torch.optim.AdamW:
    head_scale = head_lr / lr if head_lr else 1.0
    return torch.optim.AdamW(parameter_groups(module, weight_decay, layer_decay, head_scale), lr=lr,
                             betas=(beta1, beta2), eps=eps)


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

"""What the trainer asks of an objective.

An objective is an ``nn.Module`` that owns the model and any extra heads. Training one
step goes in two phases so that the loss can be normalised by the number of targets of
the *whole* step (all micro-batches, all ranks) before any backward pass:

1. ``prepare(batch, generators)`` turns a loader batch into model inputs and labels
   (e.g. dynamic masking) and returns the target counts per loss term;
2. ``forward(batch)`` returns, per loss term, the *sum* of per-target losses, plus
   summable statistics (e.g. correct predictions) for metrics.

The trainer divides each sum by its step-wide count, so k micro-batches give exactly
the gradient of one k-times larger batch, whatever the padding or masking per micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

Prepared = tuple[dict[str, torch.Tensor], dict[str, int]]  # (batch with labels, target counts per term)


@dataclass
class ObjectiveOutput:
    """Per-term loss sums and summable statistics of one micro-batch."""

    loss_sums: dict[str, torch.Tensor]
    stats: dict[str, float] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class: subclasses set ``self.model`` and implement ``prepare`` and ``forward``."""

    model: nn.Module

    def prepare(self, batch: dict[str, torch.Tensor], generators: Sequence[torch.Generator]) -> Prepared:
        """Inputs and labels for a loader batch; ``generators`` holds one per row."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:  # type: ignore[override]
        raise NotImplementedError

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        """Input tokens of a batch (for tokens/s)."""
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    def flops_per_token(self) -> float:
        """Approximate training FLOPs per input token (6 x matmul parameters), for MFU."""
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6.0 * matmul

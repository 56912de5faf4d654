"""Keeping what a model knew while it adapts: L2-SP, EWC and frozen lower layers.

Both penalties pull the backbone towards its starting weights θ0:

    L2-SP  (Li et al. 2018):        Ω = α/2 · Σ_i (θ_i − θ0_i)²
    EWC    (Kirkpatrick et al. 2017): Ω = λ/2 · Σ_i F_i (θ_i − θ0_i)²,  F = diagonal Fisher of the source task

Their gradients are added analytically (α(θ−θ0), λF(θ−θ0)) to the parameter gradients
once per optimizer step, after every micro-batch's backward and before clipping: exact,
independent of accumulation, identical on every DDP rank (each rank holds the same θ
and θ0). Only backbone parameters present at the start are pulled; new heads are free.
The diagonal Fisher is the mean squared gradient of the source loss over source
batches (the empirical Fisher). Layer-wise learning-rate decay lives in the optimizer
(``train.layer_lr_decay``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.objectives.base import Objective


@dataclass
class TransferSection:
    """How to keep the source ability while adapting (shared by pretrain and finetune)."""

    regularizer: Literal["none", "l2sp", "ewc"] = "none"
    strength: float = 0.01  # α for L2-SP, λ for EWC
    freeze_layers: int = 0  # freeze the embeddings and the lowest N blocks (-1: the whole backbone)
    fisher_batches: int = 20  # source batches for the EWC Fisher
    source_data: list[str] = field(default_factory=list)  # EWC: the source task's data (files or corpus:NAME)
    source_model: str | None = None  # EWC in fine-tuning: the earlier task's model folder (its head scores the data)

    def __post_init__(self) -> None:
        problems = []
        if self.strength < 0:
            problems.append(f"strength={self.strength}: must be >= 0")
        if self.freeze_layers < -1:
            problems.append(f"freeze_layers={self.freeze_layers}: must be >= -1")
        if self.fisher_batches < 1:
            problems.append(f"fisher_batches={self.fisher_batches}: must be >= 1")
        if problems:
            raise ConfigError(problems)


def freeze_lower_layers(model: nn.Module, layers: int) -> list[str]:
    """Stop gradients to the embeddings and the lowest ``layers`` blocks of a backbone
    (-1: every backbone parameter); returns the frozen parameter names."""
    if layers == 0:
        return []
    frozen = []
    for name, parameter in model.named_parameters():
        block = _block_index(name)
        if layers == -1 or "embed" in name or (block is not None and block < layers):
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    for index, part in enumerate(parts[:-1]):
        if part == "layers" and parts[index + 1].isdigit():
            return int(parts[index + 1])
    return None


class Anchor:
    """A quadratic pull of parameters towards their starting values, with per-weight
    importance (EWC) or uniform weight (L2-SP)."""

    def __init__(self, named: Iterable[tuple[str, nn.Parameter]], strength: float,
                 importance: dict[str, torch.Tensor] | None = None) -> None:
        self.parameters = [(name, p) for name, p in named if p.requires_grad]
        self.start = {name: p.detach().clone() for name, p in self.parameters}
        self.strength = strength
        self.importance = importance

    def _weight(self, name: str) -> torch.Tensor | float:
        return self.importance[name] if self.importance is not None else 1.0

    @torch.no_grad()
    def add_gradients(self) -> None:
        """p.grad += strength · w · (p − p0)."""
        for name, parameter in self.parameters:
            pull = self.strength * self._weight(name) * (parameter - self.start[name])
            if parameter.grad is None:
                parameter.grad = pull.to(parameter.dtype).clone()
            else:
                parameter.grad.add_(pull.to(parameter.grad.dtype))

    @torch.no_grad()
    def value(self) -> float:
        """strength/2 · Σ w (p − p0)²."""
        total = 0.0
        for name, parameter in self.parameters:
            total += float((self._weight(name) * (parameter - self.start[name]).pow(2)).sum())
        return 0.5 * self.strength * total


def fisher_diagonal(objective: Objective, batches: Iterable[dict[str, torch.Tensor]], names: Sequence[str],
                    max_batches: int) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of ``objective``'s loss: mean over batches of grad².
    ``names`` are parameter names of ``objective.model``."""
    wanted = dict(objective.model.named_parameters())
    fisher = {name: torch.zeros_like(wanted[name]) for name in names}
    was_training = objective.training
    objective.eval()  # no dropout: the Fisher of the model as it is
    seen = 0
    for batch in batches:
        if seen >= max_batches:
            break
        rows = batch["input_ids"].shape[0]
        generators = [torch.Generator().manual_seed(1_000_003 * seen + row) for row in range(rows)]
        prepared, counts = objective.prepare(batch, generators)
        objective.zero_grad(set_to_none=True)
        out = objective(prepared)
        loss = sum(out.loss_sums[k] / max(counts[k], 1) for k in out.loss_sums)
        loss.backward()  # type: ignore[union-attr]
        for name in names:
            grad = wanted[name].grad
            if grad is not None:
                fisher[name] += grad.detach().pow(2)
        seen += 1
    objective.zero_grad(set_to_none=True)
    objective.train(was_training)
    if seen == 0:
        raise ConfigError(["EWC: the source data gave no batches for the Fisher"])
    return {name: value / seen for name, value in fisher.items()}


def build_anchor(section: TransferSection, objective: Objective,
                 source_batches: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None,
                 saved: Path | None = None, fisher_objective: Objective | None = None) -> Anchor | None:
    """Freeze layers and set up the L2-SP / EWC pull for ``objective.model`` (the backbone).

    ``saved`` (RUN/anchor.safetensors) keeps θ0 and the Fisher: a resumed run pulls
    towards the weights it started from, not towards those it resumed with. The Fisher is
    taken with ``fisher_objective`` (default: ``objective``), e.g. an earlier task's model
    whose backbone has the same parameter names."""
    from lmforge.fileio import load_tensors, save_tensors

    freeze_lower_layers(objective.model, section.freeze_layers)
    if section.regularizer == "none" or section.strength == 0:
        return None
    named = [(n, p) for n, p in objective.model.named_parameters() if p.requires_grad]
    if saved is not None and saved.exists():
        stored = load_tensors(saved)
        anchor = Anchor(named, section.strength, {n: stored[f"fisher.{n}"] for n, _ in named}
                        if section.regularizer == "ewc" else None)
        anchor.start = {n: stored[f"start.{n}"] for n, _ in named}
        return anchor
    importance = None
    if section.regularizer == "ewc":
        if source_batches is None:
            raise ConfigError(["transfer.regularizer=ewc needs source data for the Fisher (the pretraining "
                               "corpus, or the earlier task's data)"])
        importance = fisher_diagonal(fisher_objective or objective, source_batches(), [n for n, _ in named],
                                     section.fisher_batches)
        mean = torch.cat([f.flatten() for f in importance.values()]).mean().clamp(min=1e-12)
        importance = {n: f / mean for n, f in importance.items()}  # mean importance 1: strength comparable to L2-SP
    anchor = Anchor(named, section.strength, importance)
    if saved is not None:
        tensors = {f"start.{n}": t for n, t in anchor.start.items()}
        tensors.update({f"fisher.{n}": t for n, t in (importance or {}).items()})
        saved.parent.mkdir(parents=True, exist_ok=True)
        save_tensors({k: v.contiguous() for k, v in tensors.items()}, saved)
    return anchor


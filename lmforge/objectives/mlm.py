"""Masked language modelling (BERT): dynamic masking, whole-word masking, NSP/SOP.

Masking is redrawn for every batch: each candidate token (never a special or padding
token) is selected with probability ``rate``; with ``whole_word`` the draw is made once
per word and applies to all of its tokens. Selected tokens become [MASK] 80% of the
time, a random token 10%, and stay unchanged 10%. Labels are the original ids on
selected positions and -100 everywhere else.

The vocabulary projection runs only on the selected rows: hidden states are gathered
first, so a batch of 32 x 128 with 15% masking projects ~614 rows instead of 4,096.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.loader import IGNORE_INDEX
from lmforge.models import MaskedLM
from lmforge.objectives.base import Objective, ObjectiveOutput, Prepared
from lmforge.objectives.clm import linear_cross_entropy


@dataclass
class MaskingConfig:
    rate: float = 0.15
    mask_fraction: float = 0.8  # of selected tokens: replaced by [MASK]
    random_fraction: float = 0.1  # of selected tokens: replaced by a random token
    whole_word: bool = False

    def __post_init__(self) -> None:
        from lmforge.errors import ConfigError

        problems = []
        if not 0 < self.rate < 1:
            problems.append(f"rate={self.rate}: must be in (0, 1)")
        if self.mask_fraction < 0 or self.random_fraction < 0 or self.mask_fraction + self.random_fraction > 1:
            problems.append(f"mask_fraction={self.mask_fraction}, random_fraction={self.random_fraction}: "
                            "must be >= 0 and sum to at most 1")
        if problems:
            raise ConfigError(problems, where="masking")


def word_start_index(word_starts: torch.Tensor) -> torch.Tensor:
    """For each position, the position where its word starts. word_starts: (B, T) bool."""
    positions = torch.arange(word_starts.shape[1], device=word_starts.device).expand_as(word_starts)
    return torch.where(word_starts, positions, torch.zeros_like(positions)).cummax(dim=1).values


def _rows_random(shape: torch.Size, generators: Sequence[torch.Generator], draw: str, high: int = 0) -> torch.Tensor:
    """Random (B, T) values, row b drawn from generators[b] (so a row's masks do not depend
    on which other rows share its batch)."""
    if draw == "rand":
        return torch.stack([torch.rand(shape[1], generator=g, device=g.device) for g in generators])
    return torch.stack([torch.randint(high, (shape[1],), generator=g, device=g.device) for g in generators])


def mask_tokens(
    input_ids: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    config: MaskingConfig,
    generator: torch.Generator | Sequence[torch.Generator],
    word_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked inputs, labels) for (B, T) ids; labels are -100 where nothing was selected.

    generator: one for the batch, or one per row (what the trainer passes, seeded by the
    row's global position, so masks are the same however rows are split into batches).
    """
    generators = [generator] * input_ids.shape[0] if isinstance(generator, torch.Generator) else list(generator)
    if len(generators) != input_ids.shape[0]:
        raise ValueError(f"{len(generators)} generators for {input_ids.shape[0]} rows")
    special = torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype, device=input_ids.device)
    candidates = ~torch.isin(input_ids, special)
    draw = _rows_random(input_ids.shape, generators, "rand")
    if config.whole_word:
        if word_starts is None:
            raise ValueError("whole-word masking needs word_starts (prepare shards with word_starts=True)")
        draw = draw.gather(1, word_start_index(word_starts))  # one draw per word
    selected = (draw < config.rate) & candidates
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    action = _rows_random(input_ids.shape, generators, "rand")
    to_mask = selected & (action < config.mask_fraction)
    to_random = selected & (action >= config.mask_fraction) & (action < config.mask_fraction + config.random_fraction)
    random_ids = _rows_random(input_ids.shape, generators, "randint", vocab_size).to(input_ids.dtype)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def masked_lm_loss_sum(model: MaskedLM, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of cross-entropy over selected positions, projecting only those rows, through
    the chunked ``linear_cross_entropy`` (no [rows x vocabulary] logits kept for backward).

    Returns (loss sum, number of correct predictions: the target holds the largest logit)."""
    rows = labels != IGNORE_INDEX  # (B, T)
    head = model.mlm_head
    picked = head.transform(hidden[rows])  # (N, H)
    return linear_cross_entropy(picked, model.encoder.embeddings.word_embeddings.weight, labels[rows], bias=head.bias)


class MaskedLMObjective(Objective):
    """MLM (+ optional NSP/SOP pair head on the pooled [CLS] state)."""

    def __init__(
        self,
        model: MaskedLM,
        mask_id: int,
        special_ids: Iterable[int],
        masking: MaskingConfig | None = None,
        pair_task: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.mask_id = mask_id
        self.special_ids = sorted(set(special_ids))
        self.masking = masking or MaskingConfig()
        self.pair_task = pair_task
        if pair_task is not None:
            if model.encoder.pooler is None:
                raise ValueError("NSP/SOP needs an encoder with a pooler (add_pooler=True)")
            self.pair_head = nn.Linear(model.config.hidden_size, 2)
            from lmforge.models.layers import init_weights

            init_weights(self.pair_head, model.config.initializer_range)

    def prepare(self, batch: dict[str, torch.Tensor], generators: Sequence[torch.Generator]) -> Prepared:
        inputs, labels = mask_tokens(batch["input_ids"], self.mask_id, self.model.config.vocab_size, self.special_ids,
                                     self.masking, generators, batch.get("word_starts"))
        prepared = {**batch, "input_ids": inputs, "labels": labels}
        counts = {"mlm": int((labels != IGNORE_INDEX).sum())}
        if self.pair_task is not None:
            counts["pair"] = int(batch["pair_labels"].numel())
        return prepared, counts

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:  # type: ignore[override]
        hidden = self.model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
        loss, correct = masked_lm_loss_sum(self.model, hidden, batch["labels"])
        sums = {"mlm": loss}
        stats = {"mlm_correct": float(correct)}
        if self.pair_task is not None:
            logits = self.pair_head(self.model.encoder.pool(hidden)).float()
            sums["pair"] = F.cross_entropy(logits, batch["pair_labels"], reduction="sum")
            stats["pair_correct"] = float((logits.argmax(-1) == batch["pair_labels"]).sum())
        return ObjectiveOutput(sums, stats)

    def flops_per_token(self) -> float:
        # the vocabulary projection runs on the masked rows only (about `rate` of tokens)
        embedding = self.model.config.vocab_size * self.model.config.hidden_size
        body = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6.0 * (body + self.masking.rate * embedding)

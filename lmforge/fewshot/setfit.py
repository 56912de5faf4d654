"""SetFit (Tunstall et al. 2022): tune a sentence encoder on pairs made from a few labelled
examples, then fit a logistic regression on its embeddings.

    pairs:  for each round and each example, one partner with the same label (target 1) and
            one with another label (target 0): as many positive as negative pairs, never an
            example with itself
    tuning: cosine similarity of the two mean-pooled, L2-normalised embeddings regressed on
            the target (squared error; sentence-transformers' CosineSimilarityLoss), through
            lmforge's Trainer
    head:   logistic regression on the mean-pooled embeddings the classify task computes
            (pooling "mean"), written as the task's linear head

The result is an ordinary classify model folder: evaluate, predict, quantise, serve and the
monitor take it as they take any fine-tuned classifier.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.data.loader import pad_batch
from lmforge.errors import DataError
from lmforge.objectives.base import Objective, ObjectiveOutput, Prepared
from lmforge.retrieval.encoder import PairLoader, mean_pooled


@dataclass(frozen=True)
class LabelledPair:
    first: int  # index into the examples
    second: int
    target: float  # 1.0 same label, 0.0 different labels


def setfit_pairs(labels: Sequence[str], texts: Sequence[str], iterations: int, seed: int) -> list[LabelledPair]:
    """``iterations`` rounds over the examples; each example gets a same-label partner (not
    itself, nor a copy of its text) and an other-label partner in each round. An example with
    no possible partner of one kind sits the round out, so the two kinds stay equal."""
    rng = random.Random(f"setfit-pairs:{seed}")
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_label[label].append(index)
    if len(by_label) < 2:
        raise DataError(f"SetFit needs at least two labels; the examples have {len(by_label)}")
    pairs: list[LabelledPair] = []
    for _ in range(iterations):
        for index, label in enumerate(labels):
            same = [j for j in by_label[label] if j != index and texts[j] != texts[index]]
            other = [j for name, items in by_label.items() if name != label for j in items]
            if not same:
                continue
            pairs.append(LabelledPair(index, rng.choice(same), 1.0))
            pairs.append(LabelledPair(index, rng.choice(other), 0.0))
    if not pairs:
        raise DataError("SetFit found no same-label pairs: every label needs two different texts")
    rng.shuffle(pairs)
    return pairs


class CosinePairObjective(Objective):
    """Squared error between the cosine of two embeddings and the pair's target."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def prepare(self, batch: dict[str, torch.Tensor], generators: Sequence[torch.Generator]) -> Prepared:
        return batch, {"cosine": int(batch["input_ids"].shape[0])}

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:  # type: ignore[override]
        a = mean_pooled(self.model, batch["input_ids"], batch["attention_mask"])
        b = mean_pooled(self.model, batch["doc_input_ids"], batch["doc_attention_mask"])
        cosine = (a * b).sum(-1)
        target = batch["target"].to(cosine.dtype)
        loss = ((cosine - target) ** 2).sum()
        correct = float(((cosine > 0.5) == (target > 0.5)).sum())
        return ObjectiveOutput({"cosine": loss}, {"cosine_correct": correct})

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum() + batch["doc_attention_mask"].sum())


def tune_encoder(model: nn.Module, tokenizer: Any, features: Sequence[dict[str, Any]], pairs: Sequence[LabelledPair],
                 run_dir: Path, epochs: float = 1.0, batch_size: int = 16, lr: float = 2e-5, seed: int = 0,
                 progress: bool = True) -> dict[str, float]:
    """Contrastive tuning of ``model`` in place on ``pairs`` of the encoded ``features``
    (AdamW, 10% warm-up, linear decay, precision as measured for this machine)."""
    from lmforge.train.loop import TrainConfig, Trainer

    rows = [{"input_ids": features[p.first]["input_ids"], "doc_input_ids": features[p.second]["input_ids"],
             "doc_key": i, "target": p.target} for i, p in enumerate(pairs)]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    batch_size = min(batch_size, len(rows))
    loader = PairLoader(rows, batch_size, pad, seed=seed)
    steps = max(1, round(epochs * loader.batches_per_epoch))
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=steps // 10, seed=seed,
                         log_every=max(1, min(10, steps // 5)), trackers=[])
    objective = CosinePairObjective(model)
    objective.train()
    summary = Trainer(objective, loader, config, run_dir, tokenizer=tokenizer, progress=progress).fit()
    model.eval()
    return {"pairs": float(len(pairs)), "steps": float(steps), **summary}


@torch.inference_mode()
def mean_features(model: nn.Module, features: Sequence[dict[str, Any]], pad_id: int, batch_size: int = 64) -> np.ndarray:
    """(N, H) masked means of the last hidden states: what the classify task's "mean"
    pooling hands its head."""
    from lmforge.tasks.base import pool

    model.eval()
    out = []
    for start in range(0, len(features), batch_size):
        batch = pad_batch([{"input_ids": f["input_ids"]} for f in features[start:start + batch_size]], pad_id)
        hidden = model.hidden_states(batch)  # type: ignore[operator]
        out.append(pool(model, hidden, batch["attention_mask"], "mean").float().numpy())
    return np.concatenate(out)


def logistic_head(embeddings: np.ndarray, targets: Sequence[int], classes: int, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes, H) weights and (classes,) bias of a logistic regression, as linear-layer
    logits whose softmax is the regression's probabilities (binary: +-z/2)."""
    from sklearn.linear_model import LogisticRegression

    fitted = LogisticRegression(max_iter=2000, random_state=seed).fit(embeddings, np.asarray(targets))
    weight, bias = np.asarray(fitted.coef_, dtype=np.float32), np.asarray(fitted.intercept_, dtype=np.float32)
    present = [int(c) for c in fitted.classes_]
    full_w = np.zeros((classes, embeddings.shape[1]), dtype=np.float32)
    full_b = np.full((classes,), -1e4 if len(present) < classes else 0.0, dtype=np.float32)
    if len(present) == 2 and weight.shape[0] == 1:
        full_w[present[0]], full_w[present[1]] = -weight[0] / 2, weight[0] / 2
        full_b[present[0]], full_b[present[1]] = -bias[0] / 2, bias[0] / 2
    else:
        for row, label in enumerate(present):
            full_w[label], full_b[label] = weight[row], bias[row]
    return torch.from_numpy(full_w), torch.from_numpy(full_b)

"""Pair scoring: (query or user history, item) -> probability of a match, a cross-encoder.

The two texts go in as a pair ([CLS] query [SEP] item [SEP]); one logit from the pooled
state, trained with binary cross-entropy (labels 0/1; graded relevance > 0 counts as a
match for the loss and keeps its grade for NDCG). Metrics: AUC over all pairs and
NDCG@k within each query group (``group`` field, else the query text) — the
recommendation and retrieval-reranking use case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import DataError
from lmforge.eval import metrics as M
from lmforge.tasks.base import Head, Task, hidden_size, hidden_states, pool


class PairScoreTask(Task):
    name = "pair-score"
    main_metric = "auc"
    fields = {"query": "query", "item": "item", "label": "label", "group": "group"}
    required_for_training = ("query", "item", "label")
    defaults = {"pooling": "auto", "max_length": 128, "truncate": False, "k": 10, "head_dropout": 0.1}

    def _relevance(self, example: dict[str, Any]) -> float:
        try:
            value = float(example["label"])
        except (TypeError, ValueError):
            raise DataError(f"{example['_source']}: label {example['label']!r} is not a number (0/1 or a grade)") from None
        if value < 0:
            raise DataError(f"{example['_source']}: label {value} is negative")
        return value

    def input_texts(self, example: dict[str, Any]) -> tuple[Any, Any]:
        return example["query"], example["item"]

    def encode(self, example: dict[str, Any], labeled: bool = True) -> list[dict[str, Any]]:
        feature = self.encode_texts(example, *self.input_texts(example))
        if labeled:
            feature["labels"] = min(self._relevance(example), 1.0)
        return [feature]

    def build_head(self, model: nn.Module) -> nn.Module:
        return Head(hidden_size(model), 1, float(self.options["head_dropout"]))

    def scores(self, objective: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = hidden_states(objective.model, batch)
        return objective.head(pool(objective.model, hidden, batch.get("attention_mask"),
                                   str(self.options["pooling"]))).float().squeeze(-1)  # (B,)

    def loss(self, scores: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        labels = batch["labels"].float()
        loss = F.binary_cross_entropy_with_logits(scores, labels, reduction="sum")
        return loss, float(((scores > 0) == (labels > 0.5)).sum())

    def decode(self, scores: torch.Tensor, batch: dict[str, torch.Tensor], features: Sequence[dict[str, Any]]
               ) -> list[dict[str, Any]]:
        return [{"probability": round(float(p), 6)} for p in scores.sigmoid()]

    def metrics(self, examples: Sequence[dict[str, Any]], predictions: Sequence[dict[str, Any]]) -> dict[str, float]:
        relevance = [self._relevance(e) for e in examples]
        scores = [p["probability"] for p in predictions]
        groups = [e.get("group") if e.get("group") is not None else e["query"] for e in examples]
        metrics = M.ranking_metrics(relevance, scores, groups, int(self.options["k"]))
        metrics["accuracy"] = sum((s > 0.5) == (r > 0) for s, r in zip(scores, relevance, strict=True)) / len(scores)
        return metrics

"""Sequence classification: single texts or text pairs; multi-class, multi-label or regression.

Multi-class: softmax over the label map learned from the training file, optional
"balanced" class weights (n / (K * count)) against imbalance; accuracy, macro-F1, MCC and
a confusion-matrix PNG. Multi-label: one sigmoid per label, a threshold, labels given as
a list or a separated string; micro/macro F1. Regression: one output, MSE; Pearson and
Spearman.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import DataError
from lmforge.eval import metrics as M
from lmforge.tasks.base import (
    Head,
    Task,
    hidden_size,
    hidden_states,
    label_index,
    pool,
    sorted_labels,
    warn_near_duplicates,
)


class ClassifyTask(Task):
    name = "classify"
    fields = {"text": "text", "text_pair": "text_pair", "label": "label"}
    required_for_training = ("text", "label")
    defaults = {"problem_type": "single_label", "threshold": 0.5, "label_separator": "|", "class_weights": False,
                "class_weight_values": None, "pooling": "auto", "max_length": 128, "truncate": False,
                "head_dropout": 0.1}

    @property
    def problem(self) -> str:
        return str(self.options["problem_type"])

    @property
    def main_metric(self) -> str:  # type: ignore[override]
        return {"single_label": "macro_f1", "multi_label": "micro_f1", "regression": "pearson"}[self.problem]

    # ------------------------------------------------------------------ data
    def _label_list(self, example: dict[str, Any]) -> list[str]:
        value = example["label"]
        if isinstance(value, str):
            return [v.strip() for v in value.split(self.options["label_separator"]) if v.strip()]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        return [str(value)]

    def fit(self, examples: Sequence[dict[str, Any]]) -> None:
        if self.problem == "regression":
            self.spec.labels = []
            return
        if self.problem == "multi_label":
            self.spec.labels = sorted_labels([name for e in examples for name in self._label_list(e)])
        else:
            self.spec.labels = sorted_labels([e["label"] for e in examples])
        warn_near_duplicates(self.spec.labels)
        if len(self.spec.labels) < 2 and self.problem == "single_label":
            raise DataError(f"training data has a single label ({self.spec.labels}); classification needs two or more")
        if self.options["class_weights"] and self.problem == "single_label":
            counts = np.bincount([self.spec.labels.index(str(e["label"])) for e in examples],
                                 minlength=len(self.spec.labels))
            weights = len(examples) / (len(counts) * np.maximum(counts, 1))
            self.options["class_weight_values"] = [float(w) for w in weights]

    def input_texts(self, example: dict[str, Any]) -> tuple[Any, Any]:
        return example["text"], example.get("text_pair")

    def encode(self, example: dict[str, Any], labeled: bool = True) -> list[dict[str, Any]]:
        feature = self.encode_texts(example, *self.input_texts(example))
        if labeled:
            feature["labels"] = self.target(example)
        return [feature]

    def target(self, example: dict[str, Any]) -> Any:
        if self.problem == "regression":
            try:
                return float(example["label"])
            except (TypeError, ValueError):
                raise DataError(f"{example['_source']}: label {example['label']!r} is not a number "
                                "(problem_type=regression)") from None
        if self.problem == "multi_label":
            vector = [0.0] * len(self.spec.labels)
            for name in self._label_list(example):
                vector[label_index(self.spec.labels, name, example)] = 1.0
            return vector
        return label_index(self.spec.labels, example["label"], example)

    # ------------------------------------------------------------------ model
    def build_head(self, model: nn.Module) -> nn.Module:
        outputs = 1 if self.problem == "regression" else len(self.spec.labels)
        return Head(hidden_size(model), outputs, float(self.options["head_dropout"]))

    def scores(self, objective: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = hidden_states(objective.model, batch)
        pooled = pool(objective.model, hidden, batch.get("attention_mask"), str(self.options["pooling"]))
        return objective.head(pooled).float()  # (B, K)

    def loss(self, scores: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        labels = batch["labels"]
        if self.problem == "regression":
            return F.mse_loss(scores.squeeze(-1), labels.float(), reduction="sum"), 0.0
        if self.problem == "multi_label":
            loss = F.binary_cross_entropy_with_logits(scores, labels, reduction="sum") / scores.shape[1]
            hits = ((scores > self._logit_threshold()) == (labels > 0.5)).all(1)
            return loss, float(hits.sum())
        weights = self.options.get("class_weight_values")
        weight = torch.tensor(weights, dtype=scores.dtype, device=scores.device) if weights else None
        loss = F.cross_entropy(scores, labels, weight=weight, reduction="sum")  # sum of weight[y] * CE
        return loss, float((scores.argmax(-1) == labels).sum())

    def _logit_threshold(self) -> float:
        p = float(self.options["threshold"])
        return float(np.log(p / (1 - p)))

    def decode(self, scores: torch.Tensor, batch: dict[str, torch.Tensor], features: Sequence[dict[str, Any]]
               ) -> list[dict[str, Any]]:
        if self.problem == "regression":
            return [{"value": float(v)} for v in scores.squeeze(-1)]
        labels = self.spec.labels
        if self.problem == "multi_label":
            probabilities = scores.sigmoid()
            threshold = float(self.options["threshold"])
            return [{"labels": [labels[i] for i in range(len(labels)) if row[i] > threshold],
                     "probabilities": {labels[i]: round(float(row[i]), 6) for i in range(len(labels))}}
                    for row in probabilities]
        probabilities = scores.softmax(-1)
        outputs = []
        for row in probabilities:
            top = row.topk(min(len(labels), 10))
            outputs.append({"label": labels[int(row.argmax())],
                            "probabilities": {labels[int(i)]: round(float(p), 6) for p, i in zip(*top, strict=True)}})
        return outputs

    # ------------------------------------------------------------------ metrics
    def metrics(self, examples: Sequence[dict[str, Any]], predictions: Sequence[dict[str, Any]]) -> dict[str, float]:
        if self.problem == "regression":
            return M.regression_metrics([float(e["label"]) for e in examples], [p["value"] for p in predictions])
        labels = self.spec.labels
        if self.problem == "multi_label":
            gold = np.array([self.target(e) for e in examples]) > 0.5
            predicted = np.array([[name in p["labels"] for name in labels] for p in predictions])
            return M.multilabel_metrics(gold, predicted)
        return M.classification_metrics([label_index(labels, e["label"], e) for e in examples],
                                        [labels.index(p["label"]) for p in predictions], len(labels))

    def plots(self, examples: Sequence[dict[str, Any]], predictions: Sequence[dict[str, Any]], folder: Path,
              name: str) -> list[Path]:
        if self.problem != "single_label":
            return []
        labels = self.spec.labels
        path = M.confusion_png([label_index(labels, e["label"], e) for e in examples],
                               [labels.index(p["label"]) for p in predictions], labels,
                               folder / f"confusion-{name}.png", f"confusion matrix ({name})")
        return [path]

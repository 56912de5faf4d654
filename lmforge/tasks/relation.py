"""Relation extraction: classify the relation between two marked entities of a sentence.

Input: ``text`` with ``head`` and ``tail`` character spans ([start, end] or {start, end}),
or a text that already carries the markers. The entities are wrapped in [E1] ... [/E1]
and [E2] ... [/E2], markers the tokenizer learns as special tokens (the embedding matrix
grows by four rows, initialised to the mean embedding). The relation is classified from
the hidden states of the two opening markers, concatenated. The metric is micro-F1 over
the relation classes with the no-relation class (``--no-relation-label``) excluded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lmforge.errors import DataError
from lmforge.eval import metrics as M
from lmforge.models import resize_token_embeddings
from lmforge.objectives.base import Objective
from lmforge.tasks.base import Head, hidden_size, hidden_states, label_index
from lmforge.tasks.classify import ClassifyTask

MARKERS = ("[E1]", "[/E1]", "[E2]", "[/E2]")


def _span(value: Any, source: str, name: str) -> tuple[int, int]:
    try:
        if isinstance(value, dict):
            return int(value["start"]), int(value["end"])
        start, end = value
        return int(start), int(end)
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{source}: {name} must be [start, end] or {{start, end}}, found {value!r}") from None


def mark_entities(text: str, head: tuple[int, int], tail: tuple[int, int], source: str) -> str:
    """``text`` with [E1]/[/E1] around ``head`` and [E2]/[/E2] around ``tail``."""
    for name, (start, end) in (("head", head), ("tail", tail)):
        if not 0 <= start < end <= len(text):
            raise DataError(f"{source}: {name} span {start}-{end} lies outside the text ({len(text)} characters)")
    if head[0] < tail[1] and tail[0] < head[1]:
        raise DataError(f"{source}: head {head} and tail {tail} overlap")
    inserts = sorted([(head[0], "[E1]"), (head[1], "[/E1]"), (tail[0], "[E2]"), (tail[1], "[/E2]")],
                     key=lambda item: item[0], reverse=True)
    for position, marker in inserts:
        text = text[:position] + f" {marker} " + text[position:]
    return text


class RelationTask(ClassifyTask):
    name = "relation"
    fields = {"text": "text", "head": "head", "tail": "tail", "label": "label"}
    required_for_training = ("text", "label")
    defaults = {**ClassifyTask.defaults, "no_relation_label": "no_relation"}

    @property
    def main_metric(self) -> str:  # type: ignore[override]
        return "micro_f1"

    def __init__(self, spec: Any, tokenizer: Any) -> None:
        super().__init__(spec, tokenizer)
        missing = [m for m in MARKERS if tokenizer.token_id(m) is None]
        if missing:
            tokenizer.backend.add_special_tokens(missing)
        self.marker_ids = [tokenizer.token_id(m) for m in MARKERS]

    def encode(self, example: dict[str, Any], labeled: bool = True) -> list[dict[str, Any]]:
        text, source = str(example["text"]), example["_source"]
        if example.get("head") is not None and example.get("tail") is not None:
            text = mark_entities(text, _span(example["head"], source, "head"), _span(example["tail"], source, "tail"),
                                 source)
        elif not all(m in text for m in MARKERS):
            raise DataError(f"{source}: give {self.spec.fields['head']!r} and {self.spec.fields['tail']!r} spans, "
                            f"or mark the text with {' '.join(MARKERS)}")
        ids = self.tokenizer.encode_full(text).ids
        limit = int(self.options["max_length"])
        if self.check_length(ids, example):
            ids = ids[: limit - 1] + ids[-1:]
        e1, e2 = self.marker_ids[0], self.marker_ids[2]
        if e1 not in ids or e2 not in ids:
            raise DataError(f"{source}: an entity marker falls beyond max_length={limit}")
        feature: dict[str, Any] = {"input_ids": ids, "token_type_ids": [0] * len(ids), "e1": ids.index(e1),
                                   "e2": ids.index(e2)}
        if labeled:
            feature["labels"] = label_index(self.spec.labels, example["label"], example)
        return [feature]

    def objective(self, model: nn.Module) -> Objective:
        if model.config.vocab_size < self.tokenizer.vocab_size:  # type: ignore[union-attr]
            resize_token_embeddings(model, self.tokenizer.vocab_size)
        return super().objective(model)

    def build_head(self, model: nn.Module) -> nn.Module:
        return Head(2 * hidden_size(model), len(self.spec.labels), float(self.options["head_dropout"]))

    def scores(self, objective: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = hidden_states(objective.model, batch)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        pair = torch.cat([hidden[rows, batch["e1"]], hidden[rows, batch["e2"]]], -1)  # (B, 2H)
        return objective.head(pair).float()

    def metrics(self, examples: Sequence[dict[str, Any]], predictions: Sequence[dict[str, Any]]) -> dict[str, float]:
        labels = self.spec.labels
        negative = str(self.options["no_relation_label"])
        gold = [label_index(labels, e["label"], e) for e in examples]
        predicted = [labels.index(p["label"]) for p in predictions]
        metrics = M.relation_micro_f1(gold, predicted, labels.index(negative) if negative in labels else None)
        metrics["macro_f1"] = M.classification_metrics(gold, predicted, len(labels))["macro_f1"]
        return metrics

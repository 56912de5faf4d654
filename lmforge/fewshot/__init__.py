"""Learning from a few labels: shots drawn per class, SetFit-style contrastive tuning of a
sentence encoder with a logistic-regression head, and in-context classification with a
decoder (verbalizers scored by log-likelihood, optional contextual calibration).

    draw_shots(examples, k, seed)                  K labelled examples per class
    setfit_pairs(examples, iterations, seed)       balanced same / different-label pairs
    train_setfit(encoder, examples, run_dir, ...)  contrastive tuning + logistic regression
    IclClassifier(decoder, tokenizer, ...)         zero- or k-shot label scores from a decoder
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from lmforge.errors import DataError


def draw_shots(examples: Sequence[dict[str, Any]], shots: int, seed: int, label: str = "label",
               where: str = "train") -> list[dict[str, Any]]:
    """``shots`` examples of every label, drawn with ``seed`` (the same seed and data give the
    same draw); refused when a label has fewer."""
    if shots < 1:
        raise DataError(f"shots={shots}: must be >= 1")
    by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for example in examples:
        by_label[str(example[label])].append(example)
    short = {name: len(items) for name, items in by_label.items() if len(items) < shots}
    if short:
        listed = ", ".join(f"{name!r} has {count}" for name, count in sorted(short.items()))
        raise DataError(f"{where}: {shots} shots per label were asked for, but {listed}")
    rng = random.Random(f"shots:{seed}:{shots}")
    chosen: list[dict[str, Any]] = []
    for name in sorted(by_label):
        chosen += rng.sample(by_label[name], shots)
    rng.shuffle(chosen)
    return chosen


def label_predictions(labels: Sequence[str], probabilities: Any) -> list[dict[str, Any]]:
    """One ``{"label", "probabilities"}`` per row of an (N, labels) tensor, as the classify task writes."""
    return [{"label": labels[int(row.argmax())],
             "probabilities": {label: round(float(v), 6) for label, v in zip(labels, row, strict=True)}}
            for row in probabilities]

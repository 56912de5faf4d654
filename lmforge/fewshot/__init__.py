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
from pathlib import Path
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


FEWSHOT_FILES = ("fewshot.json", "prompt.json")  # in-context (icl) and cloze-prompt classifiers


def fewshot_folder(folder: str | Path) -> Path | None:
    """The folder (``folder`` or its ``model/``) holding an in-context or cloze-prompt
    classifier, else None."""
    for candidate in (Path(folder), Path(folder) / "model"):
        if any((candidate / name).is_file() for name in FEWSHOT_FILES):
            return candidate
    return None


def load_fewshot(folder: str | Path) -> tuple[Any, Any]:
    """(classify task, classifier with ``predict(texts)``) of an ``icl`` or ``prompt`` run
    folder: what `lmforge evaluate` and `lmforge predict` run on such a folder. The task's
    field names and labels are those the run was trained with."""
    from lmforge.errors import CorruptFileError
    from lmforge.fileio import read_json
    from lmforge.tasks import TASKS, TaskSpec, make_task

    found = fewshot_folder(folder)
    if found is None:
        raise CorruptFileError(f"{folder}: neither fewshot.json nor prompt.json (not a few-shot classifier folder)")
    classifier: Any
    if (found / "fewshot.json").is_file():
        from lmforge.fewshot.icl import IclClassifier

        saved, classifier = read_json(found / "fewshot.json"), IclClassifier.load(found)
        labels = list(classifier.settings.labels)
    else:
        from lmforge.fewshot.prompt import PromptClassifier

        saved, classifier = read_json(found / "prompt.json"), PromptClassifier.load(found)
        labels = list(classifier.prompt.labels)
    spec = TaskSpec(**saved["task"]) if saved.get("task") else TaskSpec("classify", dict(TASKS["classify"].fields),
                                                                         labels)
    return make_task(spec, classifier.tokenizer), classifier

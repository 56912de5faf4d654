"""What every fine-tuning task shares: its saved spec, data reading, the objective that
wraps backbone + head, and streaming evaluation.

A task turns user examples into features (token ids plus labels), owns a small head on
top of the backbone's hidden states, a loss and a metric. Flow of one task::

    read(paths)  -> examples (dicts with ``_source`` = "file:line" for errors)
    fit(train)   -> label map (saved in the spec, hence in every checkpoint)
    encode(ex)   -> features (one per example; QA windows and long NER sentences give several)
    scores()     -> head outputs for a batch;  loss() -> (sum, count, correct)
    decode()     -> one small record per feature (label, probability, span ...)
    merge()      -> one prediction per example (QA keeps the best window)
    metrics()    -> numbers from gold examples and predictions

Evaluation streams: each batch is decoded to predictions at once, so no logits of the
whole set are ever held.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lmforge.data.loader import BucketedLoader
from lmforge.data.sources import read_examples
from lmforge.errors import DataError
from lmforge.hardware import autocast_context, module_device, to_device
from lmforge.models.layers import Dropout
from lmforge.objectives.base import Objective, ObjectiveOutput, Prepared
from lmforge.tokenizer import Tokenizer


@dataclass
class TaskSpec:
    """Everything a trained task model needs to read data and predict again (task.json)."""

    task: str
    fields: dict[str, str]  # our name -> the field name in the user's files
    labels: list[str] = field(default_factory=list)  # index -> label name
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Task:
    """Base class; subclasses set the class attributes and the data/model methods."""

    name = ""
    main_metric = "accuracy"
    fields: dict[str, str] = {}  # our name -> default file field
    required_for_training: tuple[str, ...] = ()  # our names that labeled data must have
    defaults: dict[str, Any] = {}  # options and their defaults
    overflow = "truncated"  # what happens to an example longer than max_length (when the task allows it)

    def __init__(self, spec: TaskSpec, tokenizer: Tokenizer) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.options = {**self.defaults, **spec.options}
        spec.options = self.options
        self.truncated = 0  # examples cut to max_length by check_length since the last encode_all

    # ------------------------------------------------------------------ data
    def read(self, sources: Sequence[str], split: str, labeled: bool = True, fmt: str | None = None
             ) -> list[dict[str, Any]]:
        """Examples from files (JSONL/CSV/TSV/Parquet, globs) or ``corpus:NAME`` sources."""
        required = list(self.required_for_training) if labeled else [n for n in self.required_for_training
                                                                      if n not in self.label_fields()]
        examples: list[dict[str, Any]] = []
        for source in sources:
            if source.startswith("corpus:"):
                examples.extend(self._corpus_examples(source[len("corpus:"):], split, required))
            else:
                examples.extend(self.read_file(source, required, fmt))
        if not examples:
            raise DataError(f"no {split} examples in {', '.join(sources)}")
        return examples

    def from_request(self, record: dict[str, Any], source: str) -> dict[str, Any]:
        """One unlabeled example from a request body (the fields under our names)."""
        return {**record, "_source": source}

    def read_file(self, path: str, required: list[str], fmt: str | None) -> Iterator[dict[str, Any]]:
        return read_examples(path, self.spec.fields, fmt=fmt, required=required)

    def _corpus_examples(self, name: str, split: str, required: list[str]) -> Iterator[dict[str, Any]]:
        from lmforge.data.corpora import corpus

        for number, record in enumerate(corpus(name).examples(split), 1):  # type: ignore[arg-type]
            example = {ours: record.get(theirs) for ours, theirs in self.spec.fields.items()}
            for ours in required:
                if example.get(ours) in (None, "", []):
                    raise DataError(f"corpus:{name} ({split}) example {number}: field {self.spec.fields[ours]!r} "
                                    f"is missing (fields present: {', '.join(record)})")
            example["_source"] = f"corpus:{name}/{split}#{number}"
            yield example

    def label_fields(self) -> tuple[str, ...]:
        return ("label",)

    def fit(self, examples: Sequence[dict[str, Any]]) -> None:
        """Learn what training data decides (the label map); default: nothing."""

    def encode(self, example: dict[str, Any], labeled: bool = True) -> list[dict[str, Any]]:
        raise NotImplementedError

    def encode_all(self, examples: Sequence[dict[str, Any]], labeled: bool = True) -> list[dict[str, Any]]:
        """Features of every example; each carries ``example`` (its example's position)."""
        features = []
        self.truncated = 0
        for index, example in enumerate(examples):
            for feature in self.encode(example, labeled):
                feature["example"] = index
                features.append(feature)
        return features

    def check_length(self, ids: list[int], example: dict[str, Any]) -> bool:
        """True when ``ids`` must be truncated (counted in ``truncated``); an error when
        truncation is off."""
        limit = int(self.options["max_length"])
        if len(ids) <= limit:
            return False
        if not self.options.get("truncate", False):
            raise DataError(f"{example['_source']}: {len(ids)} tokens exceed max_length={limit}; "
                            f"raise --max-length or pass --truncate")
        self.truncated += 1
        return True

    def input_texts(self, example: dict[str, Any]) -> tuple[Any, Any] | None:
        """The (text, pair) an example is encoded from, for tasks whose max_length can be
        chosen from the data (None: the task windows or builds its inputs itself)."""
        return None

    def choose_max_length(self, examples: Sequence[dict[str, Any]], positions: int, share: float = 0.95
                          ) -> tuple[int, float] | None:
        """Set ``max_length`` to cover ``share`` of the examples' token lengths (rounded up
        to a multiple of 8, at most the model's ``positions``); returns (length, the share
        it covers), or None for tasks that take no such choice."""
        if not examples or self.input_texts(examples[0]) is None:
            return None
        lengths = []
        for example in examples:
            text, pair = self.input_texts(example)  # type: ignore[misc]
            lengths.append(len(self.tokenizer.encode_full(str(text), str(pair) if pair not in (None, "") else None).ids))
        wanted = int(math.ceil(float(np.percentile(lengths, share * 100)) / 8) * 8)
        limit = max(8, min(positions, wanted))
        self.options["max_length"] = limit
        return limit, float(np.mean(np.asarray(lengths) <= limit))

    def encode_texts(self, example: dict[str, Any], text: Any, pair: Any = None) -> dict[str, Any]:
        """input_ids and token_type_ids of a text (or pair), checked against max_length and
        truncated (keeping the final special token) when the task allows it."""
        encoded = self.tokenizer.encode_full(str(text), str(pair) if pair not in (None, "") else None)
        ids, types = encoded.ids, encoded.token_type_ids
        if self.check_length(ids, example):
            limit = int(self.options["max_length"])
            ids, types = truncate_keep_last(ids, limit), truncate_keep_last(types, limit)
        return {"input_ids": ids, "token_type_ids": types}

    # ------------------------------------------------------------------ model
    def build_head(self, model: nn.Module) -> nn.Module | None:
        raise NotImplementedError

    def objective(self, model: nn.Module) -> Objective:
        return TaskObjective(self, model, self.build_head(model))

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Targets in a batch (what the loss sum is divided by)."""
        return int(batch["input_ids"].shape[0])

    def scores(self, objective: TaskObjective, batch: dict[str, torch.Tensor]) -> Any:
        raise NotImplementedError

    def loss(self, scores: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """(sum of per-target losses, correct predictions) for labeled batches."""
        raise NotImplementedError

    def decode(self, scores: Any, batch: dict[str, torch.Tensor], features: Sequence[dict[str, Any]]
               ) -> list[dict[str, Any]]:
        raise NotImplementedError

    def merge(self, previous: dict[str, Any] | None, output: dict[str, Any], example: dict[str, Any]
              ) -> dict[str, Any]:
        """Combine the outputs of several features of one example (default: one feature)."""
        return output

    def finish(self, prediction: dict[str, Any], example: dict[str, Any]) -> dict[str, Any]:
        return prediction

    def metrics(self, examples: Sequence[dict[str, Any]], predictions: Sequence[dict[str, Any]]) -> dict[str, float]:
        raise NotImplementedError

    def record(self, example: dict[str, Any], prediction: dict[str, Any]) -> dict[str, Any]:
        """One line of predictions.jsonl: the example's fields, gold labels included, then the
        prediction in fields of its own (``prediction``, ``probabilities``, ``predicted_tags``
        ...): nothing of the input is ever written over."""
        record = {k: v for k, v in example.items() if not k.startswith("_") and v is not None}
        for key, value in prediction.items():
            name = PREDICTION_FIELDS.get(key, key)
            record[name if name not in record else f"predicted_{key}"] = value
        return record

    def plots(self, examples: Sequence[dict[str, Any]], predictions: Sequence[dict[str, Any]], folder: Path,
              name: str) -> list[Path]:
        return []

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(
        self,
        objective: Objective,
        examples: Sequence[dict[str, Any]],
        features: Sequence[dict[str, Any]],
        batch_size: int = 64,
        labeled: bool = True,
        autocast: torch.dtype | None = None,
        progress: bool = False,
        final: bool = False,
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """(metrics, one prediction per example), batch by batch."""
        objective.eval()
        assert isinstance(objective, TaskObjective)
        pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        loader = BucketedLoader(features, batch_size, pad_id, shuffle=False)
        device = module_device(objective)
        merged: list[dict[str, Any] | None] = [None] * len(examples)
        loss_sum, count = 0.0, 0
        for batch in tqdm(loader, total=len(loader.epoch_batches(0)), disable=not progress, desc="evaluate",
                          unit="batch", leave=False):
            chosen = [features[int(i)] for i in batch["index"]]
            batch = to_device(batch, device)
            with autocast_context(autocast, device):
                scores = objective(batch, scores_only=True)  # through forward: sharded weights are gathered
                if labeled:
                    batch_loss, _ = self.loss(scores, batch)
                    loss_sum += float(batch_loss)
                    count += self.count(batch)
            for feature, output in zip(chosen, self.decode(scores, batch, chosen), strict=True):
                position = feature["example"]
                merged[position] = self.merge(merged[position], output, examples[position])
        predictions = [self.finish(p or {}, e) for p, e in zip(merged, examples, strict=True)]
        if not labeled:
            return {}, predictions
        metrics = self.metrics(examples, predictions)
        metrics["loss"] = loss_sum / max(count, 1)
        return metrics, predictions


PREDICTION_FIELDS = {"label": "prediction", "labels": "prediction", "value": "prediction"}


class TaskObjective(Objective):
    """Backbone + task head, trained by the shared trainer; the loss term is "task"."""

    def __init__(self, task: Task, model: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.task = task

    def prepare(self, batch: dict[str, torch.Tensor], generators: Sequence[torch.Generator]) -> Prepared:
        return batch, {"task": self.task.count(batch)}

    def forward(self, batch: dict[str, torch.Tensor], scores_only: bool = False) -> Any:  # type: ignore[override]
        """The loss terms; with ``scores_only`` the task's raw scores (evaluation, prediction)."""
        scores = self.task.scores(self, batch)
        if scores_only:
            return scores
        loss, correct = self.task.loss(scores, batch)
        return ObjectiveOutput({"task": loss}, {"task_correct": correct})


# ---------------------------------------------------------------------- shared pieces
def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T, H) hidden states of an encoder or decoder backbone."""
    return model.hidden_states(batch)  # type: ignore[operator,no-any-return]


def pool(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, H) sequence vector: [CLS] state, BERT pooler, masked mean, or the last real token
    (decoders). ``auto`` picks the BERT pooler when the encoder has one (as transformers'
    ``BertForSequenceClassification`` does, so the model exports to it exactly), the [CLS]
    state when it has none, and the last token for decoders."""
    if how == "auto":
        how = "last" if model.causal else ("pooler" if getattr(model, "pooler", None) is not None else "cls")
    if how == "cls":
        return hidden[:, 0]
    if how == "pooler":
        return model.pool(hidden)  # type: ignore[operator]
    mask = attention_mask if attention_mask is not None else torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if how == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    if how == "last":
        last = mask.sum(1).long() - 1  # right padding
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {how!r} (cls, pooler, mean, last, auto)")


class Head(nn.Module):
    """Dropout then a linear layer (initialised like the backbone: N(0, 0.02), zero bias)."""

    def __init__(self, in_features: int, out_features: int, dropout: float) -> None:
        super().__init__()
        self.dropout = Dropout(dropout)
        self.out = nn.Linear(in_features, out_features)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(x))


def pooling_config_path(folder: str | Path) -> Path | None:
    """The sentence-transformers Pooling config of a checkpoint folder (``modules.json``
    names its folder; else ``*_Pooling/config.json``), or None."""
    import json

    folder = Path(folder)
    if not folder.is_dir():
        return None
    pooling_dir = None
    modules = folder / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = []
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and str(entry.get("type", "")).endswith("Pooling") and entry.get("path"):
                pooling_dir = folder / str(entry["path"])  # its own folder: the root's config.json is the model's
    if pooling_dir is None:
        pooling_dir = next(iter(sorted(folder.glob("*_Pooling"))), None)
    config_path = pooling_dir / "config.json" if pooling_dir is not None else None
    return config_path if config_path is not None and config_path.is_file() else None


def checkpoint_pooling(folder: str | Path) -> tuple[str, str] | None:
    """The pooling a sentence-transformers checkpoint was trained with, from its Pooling
    config next to the weights: ``("mean" | "cls" | "last", reason)``, or None when the
    folder has no such config (or one lmforge does not pool by, e.g. max). Such an
    encoder's stored BERT pooler is not what its training used."""
    import json

    config_path = pooling_config_path(folder)
    if config_path is None:
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    modes = [mode for key, mode in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                                    ("pooling_mode_lasttoken", "last"), ("pooling_mode_max_tokens", "max"),
                                    ("pooling_mode_mean_sqrt_len_tokens", "sqrt"), ("pooling_mode_weightedmean_tokens", "w"))
             if config.get(key)]
    if len(modes) != 1 or modes[0] not in ("mean", "cls", "last"):
        return None
    where = config_path.relative_to(Path(folder)).as_posix()
    return modes[0], f"the checkpoint's sentence-transformers config, {where}"


def hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)  # type: ignore[union-attr]


def sorted_labels(values: Sequence[Any]) -> list[str]:
    """Label names in a stable order: numerically when all look like numbers."""
    names = {str(v) for v in values}
    try:
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


def warn_near_duplicates(labels: Sequence[str]) -> list[list[str]]:
    """Warn about labels that differ only in case or surrounding spaces (``pos``, ``pos ``,
    ``POS`` would be three classes); returns the groups found."""
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(label.strip().casefold(), []).append(label)
    near = [group for group in groups.values() if len(group) > 1]
    if near:
        shown = "; ".join(" / ".join(repr(label) for label in group) for group in near)
        warnings.warn(f"labels that differ only in case or spaces are separate classes: {shown}; clean the label "
                      "column if they mean the same", UserWarning, stacklevel=3)
    return near


def label_index(labels: Sequence[str], value: Any, example: dict[str, Any], what: str = "label") -> int:
    try:
        return labels.index(str(value))
    except ValueError:
        shown = ", ".join(labels[:20]) + (" ..." if len(labels) > 20 else "")
        raise DataError(f"{example['_source']}: {what} {value!r} was not seen in training (known: {shown})") from None


def truncate_keep_last(ids: list[int], limit: int) -> list[int]:
    """First ``limit`` ids, keeping the final (special) token."""
    return ids[: limit - 1] + ids[-1:]


def steps_for_epochs(epochs: float, examples: int, batch_size: int) -> int:
    return max(1, math.ceil(epochs * examples / batch_size))


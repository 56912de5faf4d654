"""Named-entity recognition: word-level tags, entity-level F1.

Input: CoNLL-style columns (word first, tag last, blank line between sentences; files
ending .conll/.bio/.iob/.bioes or ``--format conll``), JSONL with ``tokens`` + ``tags``
lists, or JSONL with ``text`` + ``spans`` ([{start, end, label}], character offsets; CJK
characters are one word each, other words split on spaces). Tags are BIO (IOB2) or
BIOES, checked on reading.

Each word's label sits on its first sub-token; the other pieces get -100, so the loss
and the prediction are per word. Predictions are repaired to valid BIO (an I-X that
starts an entity becomes B-X) and scored with seqeval in strict mode: an entity counts
only with the right type and both boundaries. Sentences longer than ``max_length`` are
an error, or with ``--truncate`` are split at word boundaries into several windows whose
predictions are joined again.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.loader import IGNORE_INDEX
from lmforge.data.sources import expand_paths, text_lines
from lmforge.errors import DataError
from lmforge.eval import metrics as M
from lmforge.tasks.base import Head, Task, hidden_size, hidden_states
from lmforge.tasks.crf import CRF, compact

CONLL_SUFFIXES = (".conll", ".bio", ".iob", ".bioes", ".iobes")
_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\s\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def read_conll(path: Path) -> Iterator[dict[str, Any]]:
    """Sentences of a CoNLL column file: word in the first column, tag in the last."""
    tokens: list[str] = []
    tags: list[str] = []
    start = 1
    for number, line in text_lines(path):  # invalid UTF-8 is a DataError naming file and line
        columns = line.split()
        if not columns or columns[0] == "-DOCSTART-":
            if tokens:
                yield {"tokens": tokens, "tags": tags, "_source": f"{path}:{start}"}
            tokens, tags, start = [], [], number + 1
            continue
        if len(columns) < 2:
            raise DataError(f"{path}:{number}: expected 'word ... tag' columns, found {line.strip()!r}")
        if not tokens:
            start = number
        tokens.append(columns[0])
        tags.append(columns[-1])
    if tokens:
        yield {"tokens": tokens, "tags": tags, "_source": f"{path}:{start}"}


def words_with_offsets(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def spans_to_tags(text: str, spans: Sequence[dict[str, Any]], source: str, scheme: str) -> tuple[list[str], list[str]]:
    """Words of ``text`` and their tags from character spans."""
    words = words_with_offsets(text)
    tags = ["O"] * len(words)
    for span in spans:
        try:
            start, end, label = int(span["start"]), int(span["end"]), str(span["label"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{source}: a span must be {{start, end, label}}, found {span!r}") from None
        inside = [i for i, (_, s, e) in enumerate(words) if s >= start and e <= end]
        cut = [i for i, (_, s, e) in enumerate(words) if s < end and e > start and i not in inside]
        if cut or not inside:
            raise DataError(f"{source}: span {start}-{end} ({text[start:end]!r}) does not fall on word boundaries")
        for position, i in enumerate(inside):
            if scheme == "BIOES" and len(inside) == 1:
                tags[i] = f"S-{label}"
            elif scheme == "BIOES" and position == len(inside) - 1:
                tags[i] = f"E-{label}"
            else:
                tags[i] = f"{'B' if position == 0 else 'I'}-{label}"
    return [w for w, _, _ in words], tags


def repair_bio(tags: list[str]) -> list[str]:
    """An I-X that does not continue an X entity starts one (B-X)."""
    fixed = list(tags)
    for i, tag in enumerate(fixed):
        if tag.startswith("I-") and (i == 0 or fixed[i - 1][2:] != tag[2:] or fixed[i - 1] == "O"):
            fixed[i] = "B-" + tag[2:]
    return fixed


class CrfHead(Head):
    """The linear head's scores as a CRF's emissions, with the CRF's transitions beside them."""

    def __init__(self, in_features: int, labels: Sequence[str], dropout: float, scheme: str) -> None:
        super().__init__(in_features, len(labels), dropout)
        self.crf = CRF(labels, scheme)


class NerTask(Task):
    name = "ner"
    main_metric = "entity_f1"
    fields = {"tokens": "tokens", "tags": "tags", "text": "text", "spans": "spans"}
    # a sentence longer than max_length is split into windows at word boundaries and joined
    # back for scoring: nothing is lost, so it is on by default (--truncate false refuses them)
    defaults = {"scheme": "BIO", "max_length": 128, "truncate": True, "head_dropout": 0.1, "crf": True}
    overflow = "split into windows at word boundaries (joined back for scoring)"
    crf: CRF | None = None  # the head's CRF, when the task has one (option "crf")

    def label_fields(self) -> tuple[str, ...]:
        return ("tags", "spans")

    def read(self, sources: Sequence[str], split: str, labeled: bool = True, fmt: str | None = None
             ) -> list[dict[str, Any]]:
        return [self._normalise(e, labeled) for e in super().read(sources, split, labeled, fmt)]

    def from_request(self, record: dict[str, Any], source: str) -> dict[str, Any]:
        return self._normalise({**record, "_source": source}, labeled=False)

    def read_file(self, path: str, required: list[str], fmt: str | None) -> Iterator[dict[str, Any]]:
        for file in expand_paths(path):
            if fmt == "conll" or (fmt is None and file.suffix.lower() in CONLL_SUFFIXES):
                yield from read_conll(file)
            else:
                yield from super().read_file(str(file), [], fmt)

    def _normalise(self, example: dict[str, Any], labeled: bool) -> dict[str, Any]:
        source, scheme = example["_source"], str(self.options["scheme"])
        if example.get("tokens"):
            tokens = [str(t) for t in example["tokens"]]
            tags = example.get("tags")
            if tags is not None and len(tags) != len(tokens):
                raise DataError(f"{source}: {len(tokens)} tokens but {len(tags)} tags")
        elif example.get("text"):
            if example.get("spans") is None:
                if labeled:
                    raise DataError(f"{source}: field {self.spec.fields['spans']!r} is missing")
                tokens, tags = [w for w, _, _ in words_with_offsets(str(example["text"]))], None
            else:
                tokens, tags = spans_to_tags(str(example["text"]), example["spans"], source, scheme)
        else:
            raise DataError(f"{source}: needs {self.spec.fields['tokens']!r} (+ {self.spec.fields['tags']!r}) or "
                            f"{self.spec.fields['text']!r} (+ {self.spec.fields['spans']!r})")
        if labeled and tags is None:
            raise DataError(f"{source}: field {self.spec.fields['tags']!r} is missing")
        if tags is not None:
            tags = [str(t) for t in tags]
            allowed = "BIOES" if scheme == "BIOES" else "BI"
            for tag in tags:
                if tag != "O" and not (len(tag) > 2 and tag[0] in allowed and tag[1] == "-"):
                    raise DataError(f"{source}: tag {tag!r} is not a {scheme} tag (O, "
                                    f"{', '.join(c + '-TYPE' for c in allowed)})")
        out = {k: v for k, v in example.items() if k not in ("spans",)}
        out.update({"tokens": tokens, "tags": tags})
        return out

    def fit(self, examples: Sequence[dict[str, Any]]) -> None:
        names = {t for e in examples for t in e["tags"]} | {"O"}
        self.spec.labels = ["O", *sorted(names - {"O"}, key=lambda t: (t[2:], t[0]))]

    def encode(self, example: dict[str, Any], labeled: bool = True) -> list[dict[str, Any]]:
        words = example["tokens"]
        encoded = self.tokenizer.encode_full(words)
        if self.check_length(encoded.ids, example):
            return self._windows(example, labeled)
        return [self._feature(example, 0, len(words), labeled)]

    def _feature(self, example: dict[str, Any], start: int, end: int, labeled: bool) -> dict[str, Any]:
        encoded = self.tokenizer.encode_full(example["tokens"][start:end])
        first: list[int | None] = [None] * (end - start)
        for position, word in enumerate(encoded.word_ids):
            if word is not None and first[word] is None:
                first[word] = position
        feature: dict[str, Any] = {"input_ids": encoded.ids, "token_type_ids": encoded.token_type_ids,
                                   "_first": first, "_offset": start}
        if labeled:
            labels = [IGNORE_INDEX] * len(encoded.ids)
            for word, position in enumerate(first):
                if position is not None:
                    tag = example["tags"][start + word]
                    if tag not in self.spec.labels:
                        raise DataError(f"{example['_source']}: tag {tag!r} was not seen in training "
                                        f"(known: {', '.join(self.spec.labels)})")
                    labels[position] = self.spec.labels.index(tag)
            feature["labels"] = labels
        return feature

    def _windows(self, example: dict[str, Any], labeled: bool) -> list[dict[str, Any]]:
        """Split at word boundaries so that each window fits in max_length."""
        words, limit = example["tokens"], int(self.options["max_length"])
        specials = len(self.tokenizer.encode_full([words[0]]).ids) - len(self.tokenizer.encode_full(
            [words[0]], add_special_tokens=False).ids)
        pieces = [max(1, len(self.tokenizer.encode_full([w], add_special_tokens=False).ids)) for w in words]
        features, start, used = [], 0, 0
        for index, size in enumerate(pieces):
            if size + specials > limit:
                raise DataError(f"{example['_source']}: word {index} ({words[index][:20]!r}) alone is {size} tokens, "
                                f"more than max_length={limit}")
            if used + size + specials > limit:
                features.append(self._feature(example, start, index, labeled))
                start, used = index, 0
            used += size
        features.append(self._feature(example, start, len(words), labeled))
        return features

    # ------------------------------------------------------------------ model
    def build_head(self, model: nn.Module) -> nn.Module:
        if self.options.get("crf"):
            head = CrfHead(hidden_size(model), self.spec.labels, float(self.options["head_dropout"]),
                           str(self.options["scheme"]))
            self.crf = head.crf
            return head
        return Head(hidden_size(model), len(self.spec.labels), float(self.options["head_dropout"]))

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum()) if "labels" in batch else 0

    def scores(self, objective: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return objective.head(hidden_states(objective.model, batch)).float()  # (B, T, K)

    def loss(self, scores: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        labels = batch["labels"]
        if self.crf is not None:  # the sequence's negative log-likelihood over its words
            keep = labels != IGNORE_INDEX
            emissions, order, mask = compact(scores, keep)
            tags = labels.gather(1, order)
            correct = float((emissions.argmax(-1)[mask] == tags[mask]).sum())
            return self.crf.nll(emissions, tags, mask), correct
        loss = F.cross_entropy(scores.reshape(-1, scores.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        keep = labels != IGNORE_INDEX
        return loss, float((scores.argmax(-1)[keep] == labels[keep]).sum())

    def decode(self, scores: torch.Tensor, batch: dict[str, torch.Tensor], features: Sequence[dict[str, Any]]
               ) -> list[dict[str, Any]]:
        if self.crf is not None:
            return self._viterbi(scores, features)
        if self.options.get("crf"):
            raise DataError("this NER model decodes with a CRF, and its transitions are not in this export; "
                            "evaluate or serve the model folder itself")
        best = scores.argmax(-1).tolist()
        outputs = []
        for row, feature in enumerate(features):
            tags = ["O" if p is None else self.spec.labels[best[row][p]] for p in feature["_first"]]
            outputs.append({"offset": feature["_offset"], "tags": tags})
        return outputs

    def _viterbi(self, scores: torch.Tensor, features: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The CRF's best tags over each window's words (their first sub-tokens)."""
        assert self.crf is not None
        keep = torch.zeros(scores.shape[:2], dtype=torch.bool, device=scores.device)
        for row, feature in enumerate(features):
            keep[row, [p for p in feature["_first"] if p is not None]] = True
        emissions, _, mask = compact(scores, keep)
        paths = self.crf.decode(emissions, mask)
        outputs = []
        for feature, path in zip(features, paths, strict=True):
            chosen = iter(path)
            tags = ["O" if p is None else self.spec.labels[next(chosen)] for p in feature["_first"]]
            outputs.append({"offset": feature["_offset"], "tags": tags})
        return outputs

    def merge(self, previous: dict[str, Any] | None, output: dict[str, Any], example: dict[str, Any]
              ) -> dict[str, Any]:
        windows = dict(previous or {})
        windows[output["offset"]] = output["tags"]
        return windows

    def finish(self, prediction: dict[str, Any], example: dict[str, Any]) -> dict[str, Any]:
        from seqeval.metrics.sequence_labeling import get_entities

        tags = [tag for offset in sorted(prediction) for tag in prediction[offset]]
        if self.options["scheme"] == "BIO":
            tags = repair_bio(tags)
        words = example["tokens"]
        entities = [{"type": kind, "start": start, "end": end + 1, "text": self._join(words[start : end + 1])}
                    for kind, start, end in get_entities(tags)]
        return {"tags": tags, "entities": entities}

    @staticmethod
    def _join(words: list[str]) -> str:
        return "".join(words) if all(M.has_cjk([w]) or len(w) == 1 for w in words) else " ".join(words)

    def metrics(self, examples: Sequence[dict[str, Any]], predictions: Sequence[dict[str, Any]]) -> dict[str, float]:
        return M.entity_metrics([e["tags"] for e in examples], [p["tags"] for p in predictions],
                                str(self.options["scheme"]))

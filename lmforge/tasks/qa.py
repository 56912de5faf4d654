"""Extractive question answering, SQuAD v1.1 and v2.0.

Input: SQuAD JSON (``{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}``) or JSONL
with ``id``, ``question``, ``context`` and ``answers`` (a list of {text, answer_start}, or
{"text": [...], "answer_start": [...]}); ``is_impossible`` or an empty answer list marks
a v2 question without answer. Every gold answer is checked against its context.

Long contexts are cut into windows of ``max_length`` tokens ([CLS] question [SEP] window
[SEP]) that overlap by ``doc_stride`` tokens. Training labels are the answer's first and
last token inside a window, or [CLS] when the window does not hold the whole answer.
Prediction takes the best-scoring span (start <= end, at most ``max_answer_length``
tokens, inside the context) over all windows of a question, maps it back to characters
through the tokenizer's offsets, and for v2 answers nothing when the [CLS] score (the
lowest over windows) beats the best span by ``null_threshold``. EM and F1 follow the
official evaluation script (in percent), max over gold answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.sources import expand_paths
from lmforge.errors import DataError
from lmforge.eval import metrics as M
from lmforge.tasks.base import Head, Task, hidden_size, hidden_states


def read_squad(path: Path) -> Iterator[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 (byte {error.object[error.start]:#04x} at offset {error.start}); "
                        "convert the file to UTF-8") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: not SQuAD JSON (expected a top-level 'data' list)")
    for article_index, article in enumerate(data["data"]):
        for paragraph_index, paragraph in enumerate(article.get("paragraphs", [])):
            context = paragraph.get("context")
            for qa in paragraph.get("qas", []):
                where = f"{path}: data[{article_index}].paragraphs[{paragraph_index}] question {qa.get('id')!r}"
                yield {"id": qa.get("id"), "question": qa.get("question"), "context": context,
                       "answers": qa.get("answers", []), "is_impossible": bool(qa.get("is_impossible", False)),
                       "_source": where}


def normalise_answers(value: Any, source: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, dict):  # {"text": [...], "answer_start": [...]}
        texts, starts = value.get("text", []), value.get("answer_start", [])
        if len(texts) != len(starts):
            raise DataError(f"{source}: answers has {len(texts)} texts but {len(starts)} answer_start values")
        value = [{"text": t, "answer_start": s} for t, s in zip(texts, starts, strict=True)]
    if not isinstance(value, list) or not all(isinstance(a, dict) and "text" in a and "answer_start" in a
                                              for a in value):
        raise DataError(f"{source}: answers must be a list of {{text, answer_start}}, found {value!r}")
    return [{"text": str(a["text"]), "answer_start": int(a["answer_start"])} for a in value]


class QaTask(Task):
    name = "qa"
    main_metric = "f1"
    fields = {"id": "id", "question": "question", "context": "context", "answers": "answers",
              "is_impossible": "is_impossible"}
    defaults = {"max_length": 384, "doc_stride": 128, "max_question_length": 64, "max_answer_length": 30,
                "version_2": None, "null_threshold": 0.0, "truncate": True, "head_dropout": 0.0}

    def label_fields(self) -> tuple[str, ...]:
        return ("answers", "is_impossible")

    def read(self, sources: Sequence[str], split: str, labeled: bool = True, fmt: str | None = None
             ) -> list[dict[str, Any]]:
        examples = super().read(sources, split, labeled, fmt)
        for index, example in enumerate(examples):
            source = example["_source"]
            for name in ("question", "context"):
                if not isinstance(example.get(name), str) or not example[name].strip():
                    raise DataError(f"{source}: field {self.spec.fields[name]!r} is missing or empty")
            example["id"] = str(example.get("id") if example.get("id") is not None else index)
            example["answers"] = normalise_answers(example.get("answers"), source)
            example["is_impossible"] = bool(example.get("is_impossible")) or (labeled and not example["answers"])
            for answer in example["answers"]:
                start, text = answer["answer_start"], answer["text"]
                if example["context"][start : start + len(text)] != text:
                    raise DataError(f"{source}: answer {text!r} is not at answer_start={start} of the context "
                                    f"(found {example['context'][start : start + len(text)]!r})")
        return examples

    def read_file(self, path: str, required: list[str], fmt: str | None) -> Iterator[dict[str, Any]]:
        for file in expand_paths(path):
            if fmt == "squad" or (fmt is None and file.suffix.lower() == ".json"):
                yield from read_squad(file)
            else:
                yield from super().read_file(str(file), [], fmt)

    def fit(self, examples: Sequence[dict[str, Any]]) -> None:
        if self.options["version_2"] is None:
            self.options["version_2"] = any(e["is_impossible"] for e in examples)

    def _special(self, token: str) -> int:
        value = self.tokenizer.token_id(token)
        if value is None:
            raise DataError(f"extractive QA needs an encoder tokenizer with {token} (this one has none)")
        return value

    def encode(self, example: dict[str, Any], labeled: bool = True) -> list[dict[str, Any]]:
        cls_id, sep_id = self._special("[CLS]"), self._special("[SEP]")
        question = self.tokenizer.encode_full(example["question"], add_special_tokens=False).ids
        question = question[: int(self.options["max_question_length"])]
        context = self.tokenizer.encode_full(example["context"], add_special_tokens=False)
        room = int(self.options["max_length"]) - len(question) - 3
        if room < 8:
            raise DataError(f"{example['_source']}: max_length={self.options['max_length']} leaves no room for the "
                            "context after the question")
        step = room - min(int(self.options["doc_stride"]), room - 1)
        answer = example["answers"][0] if labeled and example["answers"] and not example["is_impossible"] else None
        features, start = [], 0
        while True:
            end = min(start + room, len(context.ids))
            ids = [cls_id, *question, sep_id, *context.ids[start:end], sep_id]
            first = len(question) + 2
            feature: dict[str, Any] = {"input_ids": ids, "token_type_ids": [0] * first + [1] * (end - start + 1),
                                       "_first": first, "_offsets": context.offsets[start:end]}
            if labeled:
                feature["start_positions"], feature["end_positions"] = self._positions(
                    answer, context.offsets[start:end], first)
            features.append(feature)
            if end >= len(context.ids):
                return features
            start += step

    @staticmethod
    def _positions(answer: dict[str, Any] | None, offsets: list[tuple[int, int]], first: int) -> tuple[int, int]:
        """Token positions of the answer inside this window, or (0, 0) for [CLS]."""
        if answer is None or not offsets:
            return 0, 0
        char_start = answer["answer_start"]
        char_end = char_start + len(answer["text"])
        if offsets[0][0] > char_start or offsets[-1][1] < char_end:
            return 0, 0
        token_start = next(i for i, (s, e) in enumerate(offsets) if e > char_start)
        token_end = max(i for i, (s, e) in enumerate(offsets) if s < char_end)
        return first + token_start, first + token_end

    # ------------------------------------------------------------------ model
    def build_head(self, model: nn.Module) -> nn.Module:
        return Head(hidden_size(model), 2, float(self.options["head_dropout"]))

    def scores(self, objective: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return objective.head(hidden_states(objective.model, batch)).float()  # (B, T, 2)

    def loss(self, scores: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        mask = batch["attention_mask"] == 0
        start, end = scores[..., 0].masked_fill(mask, -1e4), scores[..., 1].masked_fill(mask, -1e4)
        loss = (F.cross_entropy(start, batch["start_positions"], reduction="sum")
                + F.cross_entropy(end, batch["end_positions"], reduction="sum")) / 2
        hits = (start.argmax(-1) == batch["start_positions"]) & (end.argmax(-1) == batch["end_positions"])
        return loss, float(hits.sum())

    def decode(self, scores: torch.Tensor, batch: dict[str, torch.Tensor], features: Sequence[dict[str, Any]]
               ) -> list[dict[str, Any]]:
        longest, top = int(self.options["max_answer_length"]), 20
        outputs = []
        for row, feature in enumerate(features):
            first, offsets = feature["_first"], feature["_offsets"]
            start_logits = scores[row, first : first + len(offsets), 0]
            end_logits = scores[row, first : first + len(offsets), 1]
            best: dict[str, Any] = {"score": float("-inf"), "null": float(scores[row, 0, 0] + scores[row, 0, 1])}
            if len(offsets):
                starts = start_logits.topk(min(top, len(offsets))).indices.tolist()
                ends = end_logits.topk(min(top, len(offsets))).indices.tolist()
                for s in starts:
                    for e in ends:
                        if e < s or e - s + 1 > longest:
                            continue
                        score = float(start_logits[s] + end_logits[e])
                        if score > best["score"]:
                            best.update(score=score, start=offsets[s][0], end=offsets[e][1])
            outputs.append(best)
        return outputs

    def merge(self, previous: dict[str, Any] | None, output: dict[str, Any], example: dict[str, Any]
              ) -> dict[str, Any]:
        if previous is None:
            return output
        best = dict(output if output["score"] > previous["score"] else previous)
        best["null"] = min(output["null"], previous["null"])
        return best

    def finish(self, prediction: dict[str, Any], example: dict[str, Any]) -> dict[str, Any]:
        has_span = "start" in prediction
        answer = example["context"][prediction["start"] : prediction["end"]] if has_span else ""
        if self.options["version_2"] and (not has_span or prediction["null"] > prediction["score"]
                                          + float(self.options["null_threshold"])):
            answer = ""
        return {"id": example["id"], "answer": answer, "score": round(prediction.get("score", float("-inf")), 4),
                "null_score": round(prediction.get("null", float("-inf")), 4)}

    def record(self, example: dict[str, Any], prediction: dict[str, Any]) -> dict[str, Any]:
        return {"question": example["question"], **prediction}

    def metrics(self, examples: Sequence[dict[str, Any]], predictions: Sequence[dict[str, Any]]) -> dict[str, float]:
        scores = {"has": [], "no": []}  # type: dict[str, list[tuple[float, float]]]
        for example, prediction in zip(examples, predictions, strict=True):
            golds = [] if example["is_impossible"] else [a["text"] for a in example["answers"]]
            scores["no" if not golds else "has"].append(M.squad_scores(prediction["answer"], golds or [""]))
        every = scores["has"] + scores["no"]
        metrics = {"exact_match": 100 * sum(s[0] for s in every) / len(every),
                   "f1": 100 * sum(s[1] for s in every) / len(every)}
        if self.options["version_2"]:
            for name, values in scores.items():
                if values:
                    metrics[f"{name}_answer_exact_match"] = 100 * sum(s[0] for s in values) / len(values)
                    metrics[f"{name}_answer_f1"] = 100 * sum(s[1] for s in values) / len(values)
        return metrics

"""Extractive QA: windows and offsets recover the gold text exactly, SQuAD EM/F1 known
answers, v2 no-answer handling, SQuAD JSON reading, and learning above chance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.errors import DataError
from lmforge.eval.metrics import normalise_answer, squad_scores
from lmforge.tasks import TaskSpec, make_task
from lmforge.tokenizer import Tokenizer
from tests.tasks.conftest import qa, write_jsonl
from tests.tasks.helpers import finetune

FIELDS = {"id": "id", "question": "question", "context": "context", "answers": "answers",
          "is_impossible": "is_impossible"}


def squad_file(path: Path, rows: list[dict], impossible: int = 0) -> Path:
    paragraphs = [{"context": r["context"], "qas": [{"id": r["id"], "question": r["question"], "answers": r["answers"]}]}
                  for r in rows]
    for paragraph in paragraphs[:impossible]:
        paragraph["qas"][0].update(answers=[], is_impossible=True)
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


def test_official_squad_definitions() -> None:
    assert normalise_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert squad_scores("the Eiffel Tower", ["Eiffel Tower", "tower"]) == (1.0, 1.0)
    em, f1 = squad_scores("Eiffel", ["Eiffel Tower"])
    assert em == 0.0 and f1 == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert squad_scores("", [""]) == (1.0, 1.0) and squad_scores("x", [""]) == (0.0, 0.0)
    assert squad_scores("北京市", ["北京"])[1] == pytest.approx(0.8)  # Chinese compared by characters


def test_windows_and_offsets_recover_the_gold_span(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.load(tiny_encoder_dir)
    task = make_task(TaskSpec("qa", FIELDS, [], {"max_length": 32, "doc_stride": 8}), tokenizer)
    examples = task.read([str(squad_file(tmp_path / "s.json", qa(30, 4, filler_words=40)))], "train")
    task.fit(examples)
    windows_seen = 0
    for example in examples:
        features = task.encode(example)
        assert all(len(f["input_ids"]) <= 32 for f in features)
        windows_seen += len(features)
        found = 0
        for feature in features:
            start, end = feature["start_positions"], feature["end_positions"]
            if start == 0:
                continue
            found += 1
            offsets, first = feature["_offsets"], feature["_first"]
            text = example["context"][offsets[start - first][0] : offsets[end - first][1]]
            assert text == example["answers"][0]["text"]
            # decoding the gold positions as scores gives the gold text back
        assert found >= 1  # some window holds the whole answer
    assert windows_seen > len(examples)  # the contexts really were windowed


def test_bad_answers_are_named(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    task = make_task(TaskSpec("qa", FIELDS, []), Tokenizer.load(tiny_encoder_dir))
    row = qa(1, 1)[0]
    row["answers"][0]["answer_start"] += 1
    with pytest.raises(DataError, match=r"question 'q0'.*answer '.*' is not at answer_start="):
        task.read([str(squad_file(tmp_path / "bad.json", [row]))], "train")
    (tmp_path / "broken.json").write_text('{"data": [')
    with pytest.raises(DataError, match=r"broken.json:1: not valid JSON"):
        task.read([str(tmp_path / "broken.json")], "train")


def test_qa_learns_and_handles_no_answer(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    train = squad_file(tmp_path / "train.json", qa(300, 1), impossible=40)
    validation = write_jsonl(tmp_path / "validation.jsonl", qa(60, 2))
    results = finetune(tiny_encoder_dir, tmp_path / "run", "--task", "qa", "--train", str(train), "--validation",
                       str(validation), "--max-length", "64", "--doc-stride", "16", epochs=6)
    assert results["validation"]["exact_match"] > 50, results  # chance: well under 10
    task_spec = json.loads((tmp_path / "run" / "model" / "task.json").read_text())
    assert task_spec["options"]["version_2"] is True
    predictions = [json.loads(line) for line in (tmp_path / "run" / "predictions-validation.jsonl").read_text()
                   .splitlines()]
    assert {"id", "answer", "score", "null_score"} <= set(predictions[0])

"""Relation extraction (entity markers, micro-F1 without no-relation) and pair scoring
(AUC, NDCG@k)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.errors import DataError
from lmforge.eval.metrics import ranking_metrics, relation_micro_f1
from lmforge.recipes.finetune import load_task_model
from lmforge.tasks.relation import mark_entities
from tests.tasks.conftest import pairs, relation, write_jsonl
from tests.tasks.helpers import finetune


def test_markers_and_relation_f1() -> None:
    assert mark_entities("anna lives in oslo", (0, 4), (14, 18), "x") == " [E1] anna [/E1]  lives in  [E2] oslo [/E2] "
    assert mark_entities("oslo is home of anna", (16, 20), (0, 4), "x").split() == \
        ["[E2]", "oslo", "[/E2]", "is", "home", "of", "[E1]", "anna", "[/E1]"]
    with pytest.raises(DataError, match="x:3: head .* and tail .* overlap"):
        mark_entities("abc", (0, 2), (1, 3), "x:3")
    # negative class 0: the two no-relation hits do not count; one wrong positive is a false positive
    metrics = relation_micro_f1([0, 0, 1, 2, 2], [0, 0, 1, 2, 1], negative=0)
    assert metrics["precision"] == pytest.approx(2 / 3) and metrics["recall"] == pytest.approx(2 / 3)


def test_ranking_metrics_known_answers() -> None:
    metrics = ranking_metrics([1, 0, 0, 1], [0.9, 0.8, 0.1, 0.2], ["a", "a", "b", "b"], k=2)
    assert metrics["auc"] == pytest.approx(0.75)  # 3 of 4 positive-negative pairs ordered right
    assert metrics["ndcg@2"] == pytest.approx(1.0)  # both groups rank their positive first
    metrics = ranking_metrics([0, 1], [0.9, 0.1], ["a", "a"], k=2)
    assert metrics["ndcg@2"] == pytest.approx(1 / 1.5849625, rel=1e-5)


def test_relation_learns_and_grows_the_vocabulary(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", relation(300, 1))
    validation = write_jsonl(tmp_path / "validation.jsonl", relation(90, 2))
    results = finetune(tiny_encoder_dir, tmp_path / "run", "--task", "relation", "--train", str(train),
                       "--validation", str(validation), epochs=5)
    assert results["validation"]["micro_f1"] > 0.8, results  # chance about 0.33
    task, objective = load_task_model(tmp_path / "run")
    assert task.tokenizer.token_id("[E1]") is not None
    assert objective.model.config.vocab_size == task.tokenizer.vocab_size


def test_pair_scoring_learns(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", pairs(100, 1))
    validation = write_jsonl(tmp_path / "validation.jsonl", pairs(30, 2))
    results = finetune(tiny_encoder_dir, tmp_path / "run", "--task", "pair-score", "--train", str(train),
                       "--validation", str(validation), "--k", "4", epochs=12)
    assert results["validation"]["auc"] > 0.8, results  # chance 0.5
    assert results["validation"]["ndcg@4"] > 0.8 and results["validation"]["groups"] > 10

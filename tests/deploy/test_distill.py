"""Distillation: a student taught by the teacher on unlabeled transfer data beats the same
student trained alone on the few labels there are; students from teacher layers load,
evaluate and keep their config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_model
from lmforge.deploy import distill_folder, open_source
from lmforge.deploy.distill import build_student, relation_loss, teacher_layers
from lmforge.deploy.prune import recover
from lmforge.errors import ConfigError
from lmforge.recipes.finetune import evaluate_model
from tests.tasks.conftest import sentiment, write_jsonl


def test_teacher_layers_are_evenly_spaced_ending_at_the_last() -> None:
    assert teacher_layers(6, 2) == [2, 5]
    assert teacher_layers(12, 6) == [1, 3, 5, 7, 9, 11]
    assert teacher_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ConfigError):
        teacher_layers(2, 3)


def test_relation_loss_is_zero_for_identical_relations_and_positive_otherwise() -> None:
    q = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    assert float(relation_loss([q, q, q], [q, q, q], mask, 2)) == pytest.approx(0.0, abs=1e-6)
    assert float(relation_loss([q, q, q], [torch.randn(2, 5, 8)] * 3, mask, 2)) > 0.01


def test_distilled_student_beats_the_same_student_trained_alone(task_runs: dict, tmp_path: Path) -> None:
    teacher_run, held_out = task_runs["classify"]
    transfer = write_jsonl(tmp_path / "transfer.jsonl", [{"text": r["text"]} for r in sentiment(400, 7)])
    few = sentiment(16, 8)
    steps, lr = 60, 2e-3
    summary = distill_folder(teacher_run, tmp_path / "distilled", [str(transfer)], student="bert-tiny",
                             steps=steps, lr=lr, batch_size=16, eval_data=[str(held_out)])
    distilled = summary["metrics_student"]["accuracy"]
    # the same student (same preset, same seed, same initial weights) on the labels alone
    source = open_source(teacher_run)
    torch.manual_seed(0)
    alone = build_student(source.objective, source.task, None, "bert-tiny")
    labeled = source.task.encode_all([{**r, "_source": f"few:{i}"} for i, r in enumerate(few)])
    recover(alone, source.task, labeled, steps, lr, batch_size=16)
    examples = source.task.read([str(held_out)], "test")
    alone_metrics, _ = source.task.evaluate(alone, examples, source.task.encode_all(examples), 64)
    assert distilled > alone_metrics["accuracy"] + 0.05
    assert distilled >= 0.8 * summary["metrics_teacher"]["accuracy"]
    again = evaluate_model(tmp_path / "distilled", [str(held_out)], progress=False, device="cpu")
    assert again["accuracy"] == pytest.approx(distilled)


def test_student_from_teacher_layers_loads_with_fewer_layers(task_runs: dict, tmp_path: Path) -> None:
    teacher_run, held_out = task_runs["classify"]
    summary = distill_folder(teacher_run, tmp_path / "one", [str(held_out)], student_layers=1, steps=3,
                             batch_size=8)
    assert summary["student_layers"] == 1 and summary["parameters_student"] < summary["parameters_teacher"]
    assert load_model(tmp_path / "one").config.num_layers == 1
    with pytest.raises(ConfigError, match="exactly one"):
        distill_folder(teacher_run, tmp_path / "both", [str(held_out)], student_layers=1, student="bert-tiny")
    assert not (tmp_path / "both").exists()

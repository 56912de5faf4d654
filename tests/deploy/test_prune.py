"""Pruning: 0% changes nothing; heads and neurons really leave the matrices and the smaller
model loads, evaluates and exports; impossible requests are refused before writing;
Wanda zeroes half of a decoder's layer weights and reports perplexity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_model
from lmforge.cli import main
from lmforge.deploy import export_model, prune_folder
from lmforge.errors import ConfigError
from lmforge.recipes.finetune import evaluate_model, load_task_model
from lmforge.tasks.base import BucketedLoader
from tests.tasks.conftest import translation, write_jsonl


def _scores(folder: Path, data: Path) -> torch.Tensor:
    task, objective = load_task_model(folder)
    features = task.encode_all(task.read([str(data)], "test"))
    batch = next(iter(BucketedLoader(features, 16, task.tokenizer.pad_id or 0, shuffle=False)))
    with torch.no_grad():
        return objective(batch, scores_only=True)


def test_pruning_nothing_changes_nothing(task_runs: dict, tmp_path: Path) -> None:
    run, held_out = task_runs["classify"]
    summary = prune_folder(run, tmp_path / "same", [str(held_out)])
    assert summary["parameters_after"] == summary["parameters_before"]
    assert torch.equal(_scores(tmp_path / "same", held_out), _scores(run, held_out))


def test_pruning_shrinks_the_matrices_and_the_model_still_works(task_runs: dict, tmp_path: Path) -> None:
    run, held_out = task_runs["classify"]
    summary = prune_folder(run, tmp_path / "pruned", [str(held_out)], heads=0.5, ffn=0.3, recover_steps=4,
                           recover_lr=1e-3, eval_data=[str(held_out)])
    assert summary["parameters_after"] < summary["parameters_before"]
    model = load_model(tmp_path / "pruned")
    original = load_model(run / "model")
    assert sum(summary["heads_per_layer"]) == sum(layer.attention.num_heads for layer in original.layers) // 2
    for layer, heads, width in zip(model.layers, summary["heads_per_layer"], summary["intermediate_per_layer"],
                                   strict=True):
        assert layer.attention.query.weight.shape == (heads * model.config.head_dim, model.config.hidden_size)
        assert layer.attention.output.weight.shape[1] == heads * model.config.head_dim
        assert layer.intermediate.weight.shape[0] == width == layer.output.weight.shape[1]
    assert summary["metrics_recovered"] is not None
    metrics = evaluate_model(tmp_path / "pruned", [str(held_out)], progress=False, device="cpu")
    assert metrics["accuracy"] == pytest.approx(summary["metrics_recovered"]["accuracy"])
    assert export_model(tmp_path / "pruned", "onnx", tmp_path / "onnx")["parity_max_abs"] <= 1e-4


def test_impossible_pruning_is_refused_before_writing(task_runs: dict, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run, held_out = task_runs["classify"]
    with pytest.raises(ConfigError, match="fraction in"):
        prune_folder(run, tmp_path / "all", [str(held_out)], heads=1.0)
    with pytest.raises(ConfigError, match="would empty a layer"):
        prune_folder(run, tmp_path / "layer", [str(held_out)], heads=0.75)
    assert main(["prune", "--model", str(run), "--output", str(tmp_path / "cli"), "--data", str(held_out),
                 "--heads", "0.9"]) == 2
    assert "would empty a layer" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_wanda_zeroes_half_of_each_decoder_layer(tiny_decoder_dir: Path, tmp_path: Path) -> None:
    rows = translation(400, 3)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": r["prompt"] + " " + r["target"]} for r in rows])
    summary = prune_folder(tiny_decoder_dir, tmp_path / "wanda", [str(text)], sparsity=0.5)
    assert summary["method"] == "wanda" and summary["sparsity"] == pytest.approx(0.5)
    assert summary["perplexity_after"] > 0 and summary["perplexity_before"] > 0
    model = load_model(tmp_path / "wanda")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("layers."):
            zeros = (module.weight == 0).sum(1)
            assert bool((zeros >= module.in_features // 2).all()), name  # each output row lost half

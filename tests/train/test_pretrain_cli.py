"""`lmforge pretrain` end to end on the tiny recipes, and config checking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_pretrained
from lmforge.cli import main
from lmforge.config import parse_overrides
from lmforge.errors import ConfigError
from lmforge.models import Decoder, MaskedLM
from lmforge.recipes.pretrain import fill_mask, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_every_config_problem_in_one_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(ROOT / "configs" / "bert-tiny-zh.yaml",
                    ["--train.lr", "-1", "--train.stepz", "5", "--model.overrides", "{hidden_size: 100, num_heads: 3}",
                     "--data.seq_len", "x", "--bogus.key", "1"])
    message = str(caught.value)
    for fragment in ("unknown section 'bogus'", "data.seq_len='x': must be an integer", "train.stepz: unknown key",
                     "lr=-1.0: must be a number in (0, 1]", "hidden_size=100 is not divisible by num_heads=3"):
        assert fragment in message
    assert "5 problem(s)" in message


def test_overrides_are_typed() -> None:
    assert parse_overrides(["--train.lr", "3e-4", "--train.precision=fp32", "--data.corpus", "[a, b]"]) == {
        "train": {"lr": 3e-4, "precision": "fp32"}, "data": {"corpus": ["a", "b"]}}


def test_seq_len_beyond_positions_and_wrong_objective() -> None:
    with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings=64"):
        load_config(ROOT / "configs" / "bert-tiny-zh.yaml", ["--data.seq_len", "128"])
    with pytest.raises(ConfigError, match="does not fit model preset 'bert-tiny'"):
        load_config(ROOT / "configs" / "bert-tiny-zh.yaml", ["--objective.kind", "clm", "--objective.whole_word",
                                                             "false"])


@pytest.mark.parametrize("recipe", ["bert-tiny-zh", "gpt-tiny-en"])
def test_tiny_recipe_trains_and_resumes(tmp_path: Path, recipe: str) -> None:
    run = tmp_path / "run"
    args = ["pretrain", "--config", str(ROOT / "configs" / f"{recipe}.yaml"), "--output", str(run),
            "--train.steps", "20", "--train.eval_every", "10"]
    assert main(args) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert len(evals) == 2 and evals[-1]["loss"] < evals[0]["loss"] + 0.5
    assert (run / "curves.png").exists() and (run / "config.yaml").exists()
    model, tokenizer = load_pretrained(run / "model")
    assert isinstance(model, MaskedLM if recipe.startswith("bert") else Decoder) and tokenizer is not None
    # continue the same run to more steps: resumes from its checkpoint
    assert main([*args[:-4], "--train.steps", "24", "--train.eval_every", "10", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 24
    if recipe.startswith("bert"):
        predictions = fill_mask(model, tokenizer, "中国[MASK]民")  # type: ignore[arg-type]
        assert len(predictions) == 1 and len(predictions[0]) == 5


def test_chinese_encoder_recipe_runs_in_timed_pieces_that_resume_exactly(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/chinese-encoder.yaml (shrunk, on its smallest corpus) stopped by --train.max_minutes
    and resumed piece after piece ends with the weights and losses of one uninterrupted run."""
    from lmforge.fileio import load_tensors
    from lmforge.train import loop

    shrink = ["--model.preset", "bert-tiny", "--model.overrides", "{max_position_embeddings: 64}",
              "--data.corpus", "[fortunes_zh]", "--data.vocab_size", "1500", "--data.seq_len", "32",
              "--train.steps", "12", "--train.batch_size", "8", "--train.warmup_steps", "3", "--train.eval_every", "4",
              "--train.save_every", "4", "--train.eval_batches", "2", "--train.log_every", "1",
              "--train.precision", "fp32"]
    recipe = ["pretrain", "--config", str(ROOT / "configs" / "chinese-encoder.yaml")]
    assert main([*recipe, "--output", str(tmp_path / "whole"), *shrink]) == 0

    clock = [0.0]

    def minutes_pass() -> float:  # every reading of the clock is a minute later
        clock[0] += 60.0
        return clock[0]

    monkeypatch.setattr(loop.time, "perf_counter", minutes_pass)
    pieces = tmp_path / "pieces"
    flags = [*recipe, "--output", str(pieces), *shrink, "--train.max_minutes", "5"]
    assert main(flags) == 0
    stops = []
    for _ in range(12):
        steps = [json.loads(line)["step"] for line in (pieces / "metrics.jsonl").read_text().splitlines()]
        if max(steps) >= 12:
            break
        stops.append(max(steps))
        assert main([*flags, "--resume"]) == 0
    assert 1 <= len(stops) and all(0 < s < 12 for s in stops)  # it did stop early, more than once or once
    def train_losses(run: Path) -> dict[int, float]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if r["split"] == "train"}

    def last_weights(run: Path) -> dict[str, torch.Tensor]:  # model/ is the best checkpoint; compare the last
        latest = json.loads((run / "checkpoints" / "latest.json").read_text())["path"]
        return load_tensors(run / "checkpoints" / latest / "model.safetensors")

    ours, theirs = last_weights(tmp_path / "whole"), last_weights(pieces)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    assert train_losses(tmp_path / "whole") == train_losses(pieces)

"""A run is never lost, mixed or silently wrong: folder ownership, divergence, safe outputs,
and clear one-line errors for inputs that used to give tracebacks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.recipes.finetune import predict_file
from lmforge.runs import RunFolderError, claim_run_folder
from lmforge.train import TrainConfig
from lmforge.train.loop import DivergenceError
from tests.tasks.conftest import sentiment, write_jsonl
from tests.tasks.helpers import finetune


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("safety")
    train = write_jsonl(folder / "train.jsonl", sentiment(64, 1))
    finetune(tiny_encoder_dir, folder / "run", "--task", "classify", "--train", str(train), "--validation", str(train),
             epochs=1)
    return folder, train


def test_a_finished_run_is_not_trained_into_again(finished_run: tuple[Path, Path], tiny_encoder_dir: Path) -> None:
    folder, train = finished_run
    before = _snapshot(folder / "run")
    with pytest.raises(RunFolderError, match="already holds a finished run.*--resume.*--overwrite"):
        finetune(tiny_encoder_dir, folder / "run", "--task", "classify", "--train", str(train), epochs=1)
    assert _snapshot(folder / "run") == before  # byte-identical: not even config.yaml was rewritten


def test_overwrite_moves_the_old_run_aside(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", sentiment(48, 1))
    finetune(tiny_encoder_dir, tmp_path / "run", "--task", "classify", "--train", str(train), epochs=1)
    first = _snapshot(tmp_path / "run")
    from lmforge.recipes.finetune import load_config, run_finetuning

    arguments = ["--model", str(tiny_encoder_dir), "--task", "classify", "--train", str(train), "--epochs", "1",
                 "--train.precision", "fp32"]
    run_finetuning(load_config(None, arguments), tmp_path / "run", progress=False, overwrite=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and _snapshot(aside[0]) == first
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["split"] == "setup" for line in lines) == 1  # one run's metrics, not two mixed


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path: Path) -> None:
    with claim_run_folder(tmp_path / "run"):
        with pytest.raises(RunFolderError, match="in use by a running job.*pid"):
            with claim_run_folder(tmp_path / "run", resume="auto"):
                pass
    with claim_run_folder(tmp_path / "run", resume="auto"):  # released when the holder ends (or dies)
        pass


def test_resume_with_nothing_to_resume_says_so(tmp_path: Path) -> None:
    with pytest.raises(RunFolderError, match="no checkpoint to resume from"):
        with claim_run_folder(tmp_path / "empty", resume=True):
            pass


def test_a_late_config_problem_leaves_the_folder_byte_identical(finished_run: tuple[Path, Path],
                                                                 tiny_encoder_dir: Path) -> None:
    folder, train = finished_run
    before = _snapshot(folder / "run")
    with pytest.raises(ConfigError, match="epochs and --train.steps"):
        finetune(tiny_encoder_dir, folder / "run", "--task", "classify", "--train", str(train), "--train.steps", "3",
                 epochs=1)
    assert _snapshot(folder / "run") == before


@pytest.mark.parametrize("lr", ["nan", "inf", "1e6", "-1"])
def test_absurd_learning_rates_are_config_errors(lr: str) -> None:
    with pytest.raises(ConfigError, match="lr="):
        TrainConfig(lr=float(lr))


def test_divergence_stops_the_run_and_the_last_good_checkpoint_survives(tiny_encoder_dir: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from lmforge.train.loop import Trainer

    train = write_jsonl(tmp_path / "train.jsonl", sentiment(64, 1))
    original = Trainer.train_step

    def poisoned(self: Trainer, batches):  # type: ignore[no-untyped-def]
        if self.step == 3:  # from step 4 on, the weights blow up
            with torch.no_grad():
                next(iter(self.objective.parameters())).fill_(float("inf"))
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    with pytest.raises(DivergenceError, match="diverged at step 4.*step-0000002"):
        finetune(tiny_encoder_dir, tmp_path / "run", "--task", "classify", "--train", str(train), "--train.steps", "8",
                 "--train.save_every", "2")
    assert not (tmp_path / "run" / "model").exists()  # no non-finite final model
    from lmforge.fileio import load_tensors

    kept = load_tensors(tmp_path / "run" / "checkpoints" / "step-0000002" / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in kept.values())
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))  # strict JSON


def test_predict_keeps_its_input_and_the_gold_labels(finished_run: tuple[Path, Path], tmp_path: Path) -> None:
    folder, train = finished_run
    before = train.read_bytes()
    with pytest.raises(ConfigError, match="also an input"):
        predict_file(folder / "run", [str(train)], train, progress=False)
    assert train.read_bytes() == before
    predict_file(folder / "run", [str(train)], tmp_path / "out.jsonl", progress=False)
    first = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    gold = json.loads(before.decode().splitlines()[0])["label"]
    assert first["label"] == gold and first["prediction"] in ("neg", "pos") and len(first["probabilities"]) == 2


def test_over_long_and_empty_prompts_are_one_line_errors(tiny_decoder_dir: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import time

    start = time.perf_counter()
    assert main(["generate", "--model", str(tiny_decoder_dir), "--prompt", "word " * 5000,
                 "--max_new_tokens", "10"]) == 2
    assert time.perf_counter() - start < 30  # refused before any decoding (the bound here is loose on purpose)
    error = capsys.readouterr().err.strip().splitlines()
    assert any("exceeds the model's" in line and "positions" in line for line in error)
    assert main(["generate", "--model", str(tiny_decoder_dir), "--prompt", ""]) == 2
    assert "the prompt is empty" in capsys.readouterr().err


def test_report_takes_the_run_positionally(finished_run: tuple[Path, Path]) -> None:
    folder, _ = finished_run
    assert main(["report", str(folder / "run")]) == 0
    assert (folder / "run" / "curves.png").exists()


def test_metrics_json_is_strict(tmp_path: Path) -> None:
    from lmforge.train.tracking import RunLogger

    logger = RunLogger(tmp_path, trackers=[])
    logger.log(1, "train", {"loss": math.nan, "grad_norm": math.inf, "lr": 1e-3})
    logger.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["loss"] is None and record["grad_norm"] is None and record["lr"] == 1e-3


def test_near_duplicate_labels_are_warned_about(tiny_encoder_dir: Path) -> None:
    from lmforge.tasks.base import warn_near_duplicates

    with pytest.warns(UserWarning, match=r"'POS' / 'pos' / 'pos '"):
        assert warn_near_duplicates(["POS", "neg", "pos", "pos "]) == [["POS", "pos", "pos "]]
    assert warn_near_duplicates(["neg", "pos"]) == []


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lmforge: error")]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_conll_file_with_invalid_utf8_is_one_line(tiny_encoder_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "train.conll"
    path.write_bytes("Anna B-PER\nlives O\n\ncaf\xe9 O\n".encode("latin-1"))
    line = _one_line_error(capsys, ["finetune", "--task", "ner", "--model", str(tiny_encoder_dir), "--train",
                                    str(path), "--output", str(tmp_path / "run")])
    assert "train.conll:4: not valid UTF-8" in line and not (tmp_path / "run").exists()


def test_a_malicious_training_state_is_refused_in_one_line(finished_run: tuple[Path, Path], tiny_encoder_dir: Path,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pickle
    import shutil

    folder, train = finished_run
    run = tmp_path / "run"
    shutil.copytree(folder / "run", run)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (open, (str(marker), "w"))

    latest = run / "checkpoints" / json.loads((run / "checkpoints" / "latest.json").read_text())["path"]
    argv = ["finetune", "--task", "classify", "--model", str(tiny_encoder_dir), "--train", str(train), "--epochs", "2",
            "--train.precision", "fp32", "--output", str(run), "--resume"]
    (latest / "trainer_state.pt").write_bytes(pickle.dumps(Payload()))
    assert "not a readable training state" in _one_line_error(capsys, argv)
    assert not marker.exists()  # refused, never executed
    (latest / "trainer_state.pt").write_bytes(b"PK\x03\x04 truncated")
    assert "not a readable training state" in _one_line_error(capsys, argv)


def test_a_nan_learning_rate_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "--config", "configs/bert-tiny-zh.yaml", "--output", str(tmp_path / "run"),
                 "--train.lr", "nan"]) == 2
    assert "lr=nan" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_wrong_hidden_size_error_is_short(tmp_path: Path) -> None:
    from lmforge.checkpoint import load_model, save_model
    from lmforge.errors import WeightsError
    from lmforge.fileio import read_json, write_json
    from lmforge.models import Encoder, preset

    save_model(Encoder(preset("bert-mini", vocab_size=500)), tmp_path / "model")  # type: ignore[arg-type]
    meta = read_json(tmp_path / "model" / "config.json")
    meta["model"]["hidden_size"], meta["model"]["num_heads"] = 128, 2
    write_json(tmp_path / "model" / "config.json", meta)
    with pytest.raises(WeightsError) as caught:
        load_model(tmp_path / "model")
    message = str(caught.value)
    assert "tensor(s) of the wrong shape" in message and "more" in message and len(message) < 1000


def test_ctrl_c_says_how_to_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import lmforge.recipes.pretrain
    from lmforge.train.loop import TrainingInterrupted

    def interrupted(*args: object, **kwargs: object) -> None:
        raise TrainingInterrupted(f"interrupted at step 7; the checkpoint in {tmp_path} resumes it: run the same "
                                  "command again with --resume")

    monkeypatch.setattr(lmforge.recipes.pretrain, "run_pretraining", interrupted)
    assert main(["pretrain", "--config", "configs/bert-tiny-zh.yaml", "--output", str(tmp_path)]) == 130
    error = capsys.readouterr().err
    assert "lmforge: interrupted at step 7" in error and "again with --resume" in error


def test_a_best_metric_typo_is_refused_before_any_step(finished_run: tuple[Path, Path], tiny_encoder_dir: Path,
                                                       tmp_path: Path) -> None:
    from lmforge.recipes.pretrain import load_config as pretrain_config

    with pytest.raises(ConfigError, match=r"best_metric='mlm_acc'.*mlm_accuracy"):
        pretrain_config("configs/bert-tiny-zh.yaml", ["--train.best_metric", "mlm_acc"])
    folder, train = finished_run
    with pytest.raises(ConfigError, match=r"best_metric='macro-f1'.*macro_f1"):
        finetune(tiny_encoder_dir, tmp_path / "run", "--task", "classify", "--train", str(train), "--validation",
                 str(train), "--train.best_metric", "macro-f1", epochs=1)
    assert not (tmp_path / "run").exists()

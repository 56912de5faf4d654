"""Continued pretraining (HF folder without MLM head, rehearsal), the label-efficiency
curve end to end, pipeline skip and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data import mixed_source
from lmforge.errors import ConfigError, DataError
from lmforge.recipes.curves import learning_curve
from lmforge.recipes.pipeline import load_pipeline, run_pipeline
from lmforge.recipes.pretrain import load_config, run_pretraining
from lmforge.transfer.forgetting import language_model_metrics
from tests.tasks.conftest import sentiment, write_jsonl


def test_rehearsal_mixes_the_asked_share() -> None:
    new = lambda: iter(["a" * 100] * 10)  # noqa: E731
    old = lambda: iter(["b" * 10] * 1000)  # noqa: E731
    documents = list(mixed_source(new, old, 0.2)())
    new_chars = sum(len(d) for d in documents if d[0] == "a")
    old_chars = sum(len(d) for d in documents if d[0] == "b")
    assert new_chars == 1000 and old_chars == 250  # 250 / 1250 = 0.2
    with pytest.raises(DataError, match="fewer than"):
        list(mixed_source(new, lambda: iter(["b"]), 0.5)())


def test_continued_pretraining_from_a_hf_folder_lowers_new_domain_loss(minilm_dir: Path, tmp_path: Path) -> None:
    texts = [r["text"] for r in sentiment(600, 7)]
    (tmp_path / "tweets.txt").write_text("\n".join(texts[:500]) + "\n", encoding="utf-8")
    (tmp_path / "held.txt").write_text("\n".join(texts[500:]) + "\n", encoding="utf-8")
    overrides = ["--model.init", str(minilm_dir), "--data.tokenizer", str(minilm_dir), "--data.files",
                 json.dumps([str(tmp_path / "tweets.txt")]), "--data.validation_files",
                 json.dumps([str(tmp_path / "held.txt")]), "--data.text_mode", "lines", "--data.seq_len", "32",
                 "--train.steps", "12", "--train.batch_size", "8", "--train.lr", "3e-4", "--train.eval_batches", "4",
                 "--train.log_every", "4", "--train.eval_every", "12"]
    config = load_config(None, overrides)
    before = language_model_metrics(minilm_dir, files=[str(tmp_path / "held.txt")], seq_len=32, batch_size=8,
                                    batches=4)
    run_pretraining(config, tmp_path / "run", progress=False)
    after = language_model_metrics(tmp_path / "run" / "model", files=[str(tmp_path / "held.txt")], seq_len=32,
                                   batch_size=8, batches=4)
    assert after["mlm_loss"] < before["mlm_loss"] - 1.0, (before, after)


def test_curve_picks_each_cells_learning_rate_on_validation(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    from lmforge.cli import main

    train = write_jsonl(tmp_path / "train.jsonl", sentiment(320, 1))
    validation = write_jsonl(tmp_path / "validation.jsonl", sentiment(80, 2))
    test = write_jsonl(tmp_path / "test.jsonl", sentiment(80, 3))
    main(["transfer", "curve", "--budgets", "all", "--start", f"given={tiny_encoder_dir}", "--lrs", "1e-6", "1e-3",
          "--output", str(tmp_path / "curve"), "--task", "classify", "--train", str(train), "--validation",
          str(validation), "--test", str(test), "--epochs", "4", "--train.batch_size", "16",
          "--train.warmup_steps", "0", "--train.precision", "fp32"])
    curve = json.loads((tmp_path / "curve" / "curve.json").read_text())
    run = curve["runs"][0]
    by_lr = run["validation_by_lr"]
    assert set(by_lr) == {"1e-06", "0.001"} and run["lr"] == (1e-3 if by_lr["0.001"] > by_lr["1e-06"] else 1e-6)
    best = json.loads((tmp_path / "curve" / "runs" / f"given-all-s0-lr{run['lr']:g}" / "results.json").read_text())
    assert run["value"] == best["test"][best["main_metric"]]  # the chosen run's test score, not the best test score
    assert by_lr["0.001"] > by_lr["1e-06"] + 0.3, by_lr  # a rate that cannot move the weights loses on validation
    assert "Learning rate chosen on validation" in (tmp_path / "curve" / "curve.md").read_text()
    with pytest.raises(ConfigError, match="--validation"):
        learning_curve(["--task", "classify", "--train", str(train)], ["all"], {"given": str(tiny_encoder_dir)}, [0],
                       tmp_path / "none", progress=False, lrs=[1e-4])


def test_curve_runs_end_to_end(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", sentiment(200, 1))
    validation = write_jsonl(tmp_path / "validation.jsonl", sentiment(60, 2))
    args = ["--task", "classify", "--train", str(train), "--validation", str(validation), "--epochs", "2",
            "--train.batch_size", "16", "--train.lr", "2e-3", "--train.precision", "fp32"]
    result = learning_curve(args, ["20", "all"], {"random": f"random:{tiny_encoder_dir}", "given": str(tiny_encoder_dir)},
                            [0, 1], tmp_path / "curve", progress=False)
    assert len(result["runs"]) == 8 and len(result["summary"]) == 4
    cells = {(s["start"], s["budget"]): s for s in result["summary"]}
    assert cells[("given", "20")]["labels"] == 20 and cells[("given", "all")]["labels"] == 200
    for name in ("curve.md", "curve.png", "curve.json"):
        assert (tmp_path / "curve" / name).exists()
    assert "± " in (tmp_path / "curve" / "curve.md").read_text()
    mtime = (tmp_path / "curve" / "runs" / "given-20-s0" / "results.json").stat().st_mtime
    learning_curve(args, ["20"], {"given": str(tiny_encoder_dir)}, [0], tmp_path / "curve", progress=False)
    assert (tmp_path / "curve" / "runs" / "given-20-s0" / "results.json").stat().st_mtime == mtime  # not rerun


def test_pipeline_skips_and_reruns(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", sentiment(60, 1))
    pipeline = tmp_path / "pipeline.yaml"

    def write(lr: str) -> None:
        pipeline.write_text(f"""
output: {tmp_path / 'out'}
stages:
  - name: first
    kind: finetune
    set: {{finetune.task: classify, finetune.model: "{tiny_encoder_dir}", finetune.train: ["{train}"],
           train.steps: 4, train.batch_size: 8, train.lr: {lr}}}
  - name: second
    kind: finetune
    set: {{finetune.task: classify, finetune.model: "{{first}}", finetune.train: ["{train}"], train.steps: 3,
           train.batch_size: 8}}
""")

    write("1e-3")
    assert [d["action"] for d in run_pipeline(pipeline, progress=False)] == ["ran", "ran"]
    settings = json.loads((tmp_path / "out" / "second" / "stage.json").read_text())["settings"]
    assert settings["finetune.model"] == str(tmp_path / "out" / "first" / "model")
    assert [d["action"] for d in run_pipeline(pipeline, progress=False)] == ["skipped (up to date)"] * 2
    write("2e-3")  # the first stage's inputs change: it reruns, and so does the stage that reads it
    assert [d["action"] for d in run_pipeline(pipeline, progress=False)] == ["ran", "ran"]
    assert (tmp_path / "out" / "first.old").exists()
    # an interrupted stage resumes from its checkpoint
    record = json.loads((tmp_path / "out" / "second" / "stage.json").read_text())
    (tmp_path / "out" / "second" / "stage.json").write_text(json.dumps({**record, "complete": False}))
    assert [d["action"] for d in run_pipeline(pipeline, progress=False)] == ["skipped (up to date)", "resumed"]


def test_pipeline_errors_are_listed(tmp_path: Path) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("stages:\n  - {name: a, kind: train}\n  - {name: b, kind: finetune, set: {model: '{c}'}}\n")
    with pytest.raises(ConfigError) as error:
        load_pipeline(pipeline)
    text = str(error.value)
    assert "kind='train' must be pretrain or finetune" in text and "{c} is not an earlier stage" in text
    assert "set key 'model' must be section.key" in text


def test_sequential_finetuning_forgetting_and_ewc(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    from lmforge.transfer.forgetting import task_after_adaptation
    from tests.tasks.conftest import ner
    from tests.tasks.helpers import finetune

    first = write_jsonl(tmp_path / "a.jsonl", sentiment(200, 1))
    second = write_jsonl(tmp_path / "b.jsonl", ner(120, 1))
    a = finetune(tiny_encoder_dir, tmp_path / "a", "--task", "classify", "--train", str(first), "--validation",
                 str(first), epochs=3)
    # task B with a softmax head at the backbone's rate: the whole network moves, so there is forgetting to measure
    second_task = ["--task", "ner", "--train", str(second), "--ner.crf", "false", "--train.head_lr", "2e-3"]
    plain = finetune(tmp_path / "a" / "model", tmp_path / "b", *second_task, epochs=3)
    kept = finetune(tmp_path / "a" / "model", tmp_path / "b-ewc", *second_task,
                    "--transfer.regularizer", "ewc", "--transfer.strength", "100", "--transfer.source_model",
                    str(tmp_path / "a" / "model"), "--transfer.source_data", json.dumps([str(first)]), epochs=3)
    assert (tmp_path / "b-ewc" / "anchor.safetensors").exists() and plain["steps"] == kept["steps"]
    # the earlier task scored again with its own head on each later backbone
    same = task_after_adaptation(tmp_path / "a" / "model", tmp_path / "a" / "model", [str(first)])
    assert same["accuracy"] == pytest.approx(a["validation"]["accuracy"], abs=0.02)
    after_plain = task_after_adaptation(tmp_path / "a" / "model", tmp_path / "b" / "model", [str(first)])
    after_ewc = task_after_adaptation(tmp_path / "a" / "model", tmp_path / "b-ewc" / "model", [str(first)])
    assert after_ewc["loss"] < after_plain["loss"]  # the EWC pull keeps more of task A


def test_continued_pretraining_of_a_decoder(tiny_decoder_dir: Path, tmp_path: Path) -> None:
    texts = [f"{r['text']} ." for r in sentiment(300, 4)]
    (tmp_path / "a.txt").write_text("\n".join(texts[:250]) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(texts[250:]) + "\n", encoding="utf-8")
    config = load_config(None, ["--model.init", str(tiny_decoder_dir), "--data.tokenizer", str(tiny_decoder_dir),
                                "--data.files", json.dumps([str(tmp_path / "a.txt")]), "--data.text_mode", "lines",
                                "--data.seq_len", "32", "--objective.kind", "clm", "--objective.whole_word", "false",
                                "--train.steps", "30", "--train.batch_size", "8", "--train.lr", "3e-3",
                                "--train.log_every", "10", "--transfer.regularizer", "l2sp", "--transfer.strength",
                                "0.1"])
    before = language_model_metrics(tiny_decoder_dir, files=[str(tmp_path / "b.txt")], seq_len=32, batch_size=8,
                                    batches=3)
    run_pretraining(config, tmp_path / "run", progress=False)
    after = language_model_metrics(tmp_path / "run" / "model", files=[str(tmp_path / "b.txt")], seq_len=32,
                                   batch_size=8, batches=3)
    assert after["clm_loss"] < before["clm_loss"] - 1.0, (before, after)


def test_pipeline_cli_takes_the_file_positionally(tmp_path: Path) -> None:
    from lmforge.cli import main

    (tmp_path / "p.yaml").write_text("stages: []\n")
    assert main(["pipeline", "run", str(tmp_path / "p.yaml")]) == 2  # parsed, then refused: no stages

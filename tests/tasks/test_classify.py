"""Sequence classification: learns above chance, keeps head and label map across a
reload, multi-label / regression / pairs, class weights, LLRD groups, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.errors import ConfigError, DataError
from lmforge.recipes.finetune import evaluate_model, load_config, load_task_model, predict_file, run_finetuning
from lmforge.tasks import TaskSpec, make_task
from lmforge.train.optim import parameter_groups
from tests.tasks.conftest import sentiment, write_jsonl
from tests.tasks.helpers import finetune


@pytest.fixture(scope="module")
def sentiment_run(tiny_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    folder = tmp_path_factory.mktemp("sentiment")
    train = write_jsonl(folder / "train.jsonl", sentiment(320, 1))
    validation = write_jsonl(folder / "validation.jsonl", sentiment(100, 2))
    results = finetune(tiny_encoder_dir, folder / "run", "--task", "classify", "--train", str(train),
                       "--validation", str(validation), "--test", str(validation), epochs=4)
    return folder, validation, results


def test_classification_learns_and_reports(sentiment_run: tuple[Path, Path, dict]) -> None:
    folder, _, results = sentiment_run
    assert results["validation"]["accuracy"] > 0.85  # chance is 0.5
    assert results["validation"]["macro_f1"] > 0.85 and results["validation"]["mcc"] > 0.7
    assert results["labels"] == ["neg", "pos"]
    run = folder / "run"
    for name in ("results.json", "report.md", "curves.png", "confusion-validation.png", "predictions-test.jsonl"):
        assert (run / name).exists(), name
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["metric"] == "eval macro_f1"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["split"] == "eval"]
    assert best["value"] == max(r["macro_f1"] for r in evals)  # the best checkpoint is the best evaluation


def test_reload_gives_identical_predictions(sentiment_run: tuple[Path, Path, dict], tmp_path: Path) -> None:
    folder, validation, results = sentiment_run
    task, objective = load_task_model(folder / "run")
    assert task.spec.labels == ["neg", "pos"]
    assert predict_file(folder / "run" / "model", [str(validation)], tmp_path / "p.jsonl", progress=False) == 100
    again = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    saved = [json.loads(line) for line in (folder / "run" / "predictions-test.jsonl").read_text().splitlines()]
    assert [a["prediction"] for a in again] == [s["prediction"] for s in saved]
    assert all(s["label"] in ("neg", "pos") for s in saved)  # the gold label is kept, never overwritten
    for a, s in zip(again, saved, strict=True):
        assert a["probabilities"] == pytest.approx(s["probabilities"], abs=2e-2)  # bf16 eval in the run, fp32 here
    metrics = evaluate_model(folder / "run", [str(validation)], progress=False)
    assert metrics["accuracy"] == pytest.approx(results["test"]["accuracy"], abs=0.02)


def test_unknown_label_at_evaluation_is_named(sentiment_run: tuple[Path, Path, dict], tmp_path: Path) -> None:
    folder, _, _ = sentiment_run
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "good film", "label": "pos"}, {"text": "meh", "label": "mixed"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: label 'mixed' was not seen in training \(known: neg, pos\)"):
        evaluate_model(folder / "run", [str(bad)], progress=False)


@pytest.mark.parametrize("rows, flags, message", [
    ([{"text": "good film", "label": "pos"}, {"text": "bad film"}], [], r"train.jsonl:2: field 'label' is missing"),
    ([{"text": "good film", "label": "pos"}, {"text": "  ", "label": "neg"}], [],
     r"train.jsonl:2: field 'text' is empty"),
    ([{"text": "good film", "label": "pos"}, {"text": "bad " * 200, "label": "neg"}], ["--max-length", "128"],
     r"train.jsonl:2: 202 tokens exceed max_length=128; raise --max-length or pass --truncate"),
])
def test_malformed_files_fail_before_anything_is_written(tiny_encoder_dir: Path, tmp_path: Path, rows: list,
                                                         flags: list, message: str) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("previous results")
    with pytest.raises(DataError, match=message):  # an explicit max_length without --truncate refuses long texts
        finetune(tiny_encoder_dir, run, "--task", "classify", "--train", str(train), *flags)
    assert sorted(p.name for p in run.iterdir()) == ["results.json"]
    assert (run / "results.json").read_text() == "previous results"


def test_truncate_keeps_the_final_separator(tiny_encoder_dir: Path) -> None:
    from lmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tiny_encoder_dir)
    task = make_task(TaskSpec("classify", {"text": "text", "text_pair": "text_pair", "label": "label"}, ["neg", "pos"],
                              {"max_length": 16, "truncate": True}), tokenizer)
    (feature,) = task.encode({"text": "good " * 40, "label": "pos", "_source": "x:1"})
    assert len(feature["input_ids"]) == 16 and feature["input_ids"][-1] == tokenizer.token_id("[SEP]")


def test_multilabel_regression_and_pairs(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    rows = sentiment(320, 3)
    multi = [{"text": r["text"] + (" paris" if i % 2 else ""),
              "label": r["label"] + ("|travel" if i % 2 else "")} for i, r in enumerate(rows)]
    train = write_jsonl(tmp_path / "multi.jsonl", multi[:260])
    validation = write_jsonl(tmp_path / "multi-val.jsonl", multi[260:])
    results = finetune(tiny_encoder_dir, tmp_path / "multi", "--task", "classify", "--problem-type", "multi_label",
                       "--train", str(train), "--validation", str(validation), epochs=6)
    assert results["labels"] == ["neg", "pos", "travel"]
    assert results["validation"]["micro_f1"] > 0.8 and results["validation"]["subset_accuracy"] > 0.5

    scores = [{"text": r["text"], "label": 1.0 if r["label"] == "pos" else -1.0} for r in rows]
    train = write_jsonl(tmp_path / "reg.jsonl", scores[:260])
    validation = write_jsonl(tmp_path / "reg-val.jsonl", scores[260:])
    results = finetune(tiny_encoder_dir, tmp_path / "reg", "--task", "classify", "--problem-type", "regression",
                       "--train", str(train), "--validation", str(validation), epochs=6)
    assert results["validation"]["pearson"] > 0.7

    pairs = [{"text": r["text"].split()[0], "text_pair": r["text"], "label": r["label"]} for r in rows]
    train = write_jsonl(tmp_path / "pair.jsonl", pairs[:260])
    validation = write_jsonl(tmp_path / "pair-val.jsonl", pairs[260:])
    results = finetune(tiny_encoder_dir, tmp_path / "pairs", "--task", "classify", "--train", str(train),
                       "--validation", str(validation), epochs=4)
    assert results["validation"]["accuracy"] > 0.8


def test_class_weights_are_balanced(tiny_encoder_dir: Path) -> None:
    from lmforge.tokenizer import Tokenizer

    task = make_task(TaskSpec("classify", {"text": "text", "text_pair": "text_pair", "label": "label"}, [],
                              {"class_weights": True}), Tokenizer.load(tiny_encoder_dir))
    task.fit([{"text": "x", "label": "a"}] * 6 + [{"text": "y", "label": "b"}] * 2)
    assert task.options["class_weight_values"] == pytest.approx([8 / (2 * 6), 8 / (2 * 2)])
    scores = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    loss, _ = task.loss(scores, {"labels": torch.tensor([0, 1])})
    assert float(loss) == pytest.approx(float(torch.log(torch.tensor(2.0))) * (8 / 12 + 8 / 4), rel=1e-5)


def test_layer_wise_lr_decay_groups(tiny_encoder_dir: Path) -> None:
    from lmforge.checkpoint import load_model

    model = load_model(tiny_encoder_dir)  # 2 layers: depths 0 (embeddings), 1, 2, 3 (head / above)
    module = torch.nn.ModuleDict({"model": model, "head": torch.nn.Linear(4, 2)})
    groups = parameter_groups(module, 0.01, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(model.embeddings.word_embeddings.weight)] == pytest.approx(0.125)
    assert scale[id(model.layers[0].attention.query.weight)] == pytest.approx(0.25)
    assert scale[id(model.layers[1].output.weight)] == pytest.approx(0.5)
    assert scale[id(module["head"].weight)] == pytest.approx(1.0)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.layers[0].attention_norm.weight) not in decayed and id(module["head"].bias) not in decayed


def test_a_task_head_gets_its_own_learning_rate(tiny_encoder_dir: Path) -> None:
    from lmforge.checkpoint import load_model
    from lmforge.train.optim import build_optimizer

    model = load_model(tiny_encoder_dir)
    module = torch.nn.ModuleDict({"model": model, "head": torch.nn.Linear(4, 2)})
    optimizer = build_optimizer(module, 5e-5, 0.01, 0.9, 0.999, 1e-8, head_lr=1e-3)
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    assert scale[id(module["head"].weight)] == pytest.approx(20.0) and scale[id(module["head"].bias)] == pytest.approx(20.0)
    assert scale[id(model.layers[1].output.weight)] == 1.0 and scale[id(model.embeddings.word_embeddings.weight)] == 1.0
    plain = build_optimizer(module, 5e-5, 0.01, 0.9, 0.999, 1e-8)
    assert {g["lr_scale"] for g in plain.param_groups} == {1.0}


def test_config_errors_are_collected(tiny_encoder_dir: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, ["--task", "sentiment", "--model", str(tiny_encoder_dir), "--train", "x.jsonl",
                           "--train.layer_lr_decay", "2"])
    assert "finetune.task='sentiment': must be one of 'classify'" in str(error.value)
    assert "layer_lr_decay=2.0: must be in (0, 1]" in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_config(None, ["--task", "ner", "--model", str(tiny_encoder_dir), "--train", "x.jsonl", "--epochs", "0",
                           "--label-feild", "y"])
    assert "epochs=0: must be > 0" in str(error.value) and "finetune.label_feild: unknown key" in str(error.value)


def test_steps_override_epochs(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    config = load_config(None, ["--task", "classify", "--model", str(tiny_encoder_dir), "--train", "a.jsonl",
                                "--train.steps", "7"])
    assert config["finetune"].epochs is None and config["train"].steps == 7
    config = load_config(None, ["--task", "classify", "--model", str(tiny_encoder_dir), "--train", "a.jsonl"])
    assert config["finetune"].epochs == 3.0 and config["train"].lr == 5e-5
    train = write_jsonl(tmp_path / "t.jsonl", sentiment(40, 5))
    results = run_finetuning(load_config(None, ["--task", "classify", "--model", str(tiny_encoder_dir), "--train",
                                                str(train), "--train.steps", "3", "--train.batch_size", "8"]),
                             tmp_path / "run", progress=False)
    assert results["steps"] == 3


def test_the_python_api_fine_tunes_evaluates_and_predicts(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    import lmforge

    train = write_jsonl(tmp_path / "train.jsonl", sentiment(64, 1))
    results = lmforge.finetune("classify", tiny_encoder_dir, train, tmp_path / "run", validation=str(train),
                               overrides=["--epochs", "1", "--train.precision", "fp32"], progress=False)
    assert results["labels"] == ["neg", "pos"] and "validation" in results
    metrics = lmforge.evaluate(tmp_path / "run", [str(train)], progress=False, precision="fp32")
    assert metrics["accuracy"] == pytest.approx(results["validation"]["accuracy"], abs=1e-6)
    assert lmforge.predict(tmp_path / "run", [str(train)], tmp_path / "p.jsonl", progress=False) == 64


def test_max_length_is_chosen_from_the_data(tiny_encoder_dir: Path, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from lmforge.tokenizer import Tokenizer

    rows = sentiment(100, 3)
    for row in rows[:4]:
        row["text"] = " ".join(["lovely"] * 300)  # 4 of 100 examples are far longer than the rest
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    tokenizer = Tokenizer.load(tiny_encoder_dir)
    lengths = sorted(len(tokenizer.encode(r["text"])) for r in rows)
    with caplog.at_level(logging.WARNING):
        results = finetune(tiny_encoder_dir, tmp_path / "run", "--task", "classify", "--train", str(train),
                           "--train.steps", "2")
    chosen = results["max_length"]
    assert results["chosen_from_data"] and chosen % 8 == 0 and chosen < 300  # far below the 4 long texts
    covered = sum(length <= chosen for length in lengths) / len(lengths)
    assert covered >= 0.95 and results["train_share_covered"] == pytest.approx(covered, abs=1e-4)
    over = sum(length > chosen for length in lengths)
    assert results["truncated_train"] == over == 4  # exactly the over-long examples
    assert f"{over} of 100 examples are longer than max_length={chosen}" in caplog.text
    spec = json.loads((tmp_path / "run" / "model" / "task.json").read_text())
    assert spec["options"]["max_length"] == chosen  # saved with the model: prediction uses the same length


def test_a_chosen_max_length_never_exceeds_the_model_positions(tiny_encoder_dir: Path) -> None:
    from lmforge.tokenizer import Tokenizer

    task = make_task(TaskSpec("classify", {"text": "text", "label": "label"}, [], {}), Tokenizer.load(tiny_encoder_dir))
    examples = [{"text": " ".join(["lovely"] * 100), "label": "pos"}] * 20
    assert task.choose_max_length(examples, positions=48) == (48, 0.0)
    assert task.options["max_length"] == 48


def _sentence_transformers_folder(source: Path, target: Path, mode: str) -> Path:
    """A copy of ``source`` laid out as a sentence-transformers checkpoint pooling by ``mode``."""
    import shutil

    shutil.copytree(source, target)
    (target / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (target / "1_Pooling").mkdir()
    keys = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}
    (target / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                                  **{key: name == mode for name, key in keys.items()}}))
    return target


def test_checkpoint_pooling_reads_a_sentence_transformers_config(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    from lmforge.tasks.base import checkpoint_pooling

    assert checkpoint_pooling(tiny_encoder_dir) is None  # an lmforge folder: the encoder's own pooler
    assert checkpoint_pooling(_sentence_transformers_folder(tiny_encoder_dir, tmp_path / "m", "mean"))[0] == "mean"  # type: ignore[index]
    assert checkpoint_pooling(_sentence_transformers_folder(tiny_encoder_dir, tmp_path / "c", "cls"))[0] == "cls"  # type: ignore[index]
    assert checkpoint_pooling(_sentence_transformers_folder(tiny_encoder_dir, tmp_path / "x", "max")) is None  # not offered
    rooted = _sentence_transformers_folder(tiny_encoder_dir, tmp_path / "r", "mean")
    (rooted / "modules.json").write_text(json.dumps([{"idx": 1, "path": "", "type": "sentence_transformers.models.Pooling"}]))
    assert checkpoint_pooling(rooted)[0] == "mean"  # type: ignore[index]  # the model's own config.json is never read as one


def test_a_random_start_pools_like_its_checkpoint(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    from lmforge.recipes.curves import random_start
    from lmforge.tasks.base import checkpoint_pooling

    model = _sentence_transformers_folder(tiny_encoder_dir, tmp_path / "st", "mean")
    fresh = random_start(str(model), tmp_path / "fresh", 0)
    assert checkpoint_pooling(fresh)[0] == "mean"  # type: ignore[index]  # the curve compares like with like
    assert checkpoint_pooling(random_start(str(tiny_encoder_dir), tmp_path / "plain", 0)) is None


def test_auto_pooling_follows_the_checkpoint_and_is_saved(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    model = _sentence_transformers_folder(tiny_encoder_dir, tmp_path / "st", "mean")
    train = write_jsonl(tmp_path / "train.jsonl", sentiment(64, 1))
    results = finetune(model, tmp_path / "run", "--task", "classify", "--train", str(train), epochs=1)
    assert results["pooling"] == "mean" and "1_Pooling/config.json" in results["pooling_reason"]
    saved = json.loads((tmp_path / "run" / "model" / "task.json").read_text())
    assert saved["options"]["pooling"] == "mean"  # prediction, export and serving pool the same way
    explicit = finetune(model, tmp_path / "cls", "--task", "classify", "--train", str(train), "--pooling", "cls", epochs=1)
    assert "pooling" not in explicit  # an explicit value wins and is not overridden
    assert json.loads((tmp_path / "cls" / "model" / "task.json").read_text())["options"]["pooling"] == "cls"


def test_attention_dropout_auto_is_off_on_cpu_only() -> None:
    from lmforge.models import Decoder, Encoder, preset
    from lmforge.recipes.finetune import resolve_attention_dropout

    for model in (Encoder(preset("bert-tiny", vocab_size=50, attention_dropout=0.1)),  # type: ignore[arg-type]
                  Decoder(preset("llama-tiny", vocab_size=50, dropout=0.1))):  # type: ignore[arg-type]
        def rates(model: torch.nn.Module = model) -> set[float]:
            return {float(m.dropout) for m in model.modules() if type(m).__name__ in ("Attention", "SelfAttention")}

        chosen = resolve_attention_dropout("auto", model, torch.device("cuda"), progress=False)
        assert chosen["attention_dropout"] == 0.1 and rates() == {0.1}  # fused GPU kernels take dropout
        chosen = resolve_attention_dropout("auto", model, torch.device("cpu"), progress=False)
        assert chosen["attention_dropout"] == 0.0 and rates() == {0.0} and "0.1" in chosen["attention_dropout_reason"]
        assert resolve_attention_dropout(0.2, model, torch.device("cpu"), progress=False)["attention_dropout"] == 0.2
        assert rates() == {0.2}


def test_attention_dropout_is_saved_and_checked(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_encoder_dir / "config.json").read_text())["model"]
    assert config["attention_dropout"] > 0  # the fixture's checkpoint trains with attention dropout
    train = write_jsonl(tmp_path / "train.jsonl", sentiment(32, 1))
    results = finetune(tiny_encoder_dir, tmp_path / "run", "--task", "classify", "--train", str(train), epochs=1)
    assert results["attention_dropout"] == 0.0
    kept = finetune(tiny_encoder_dir, tmp_path / "kept", "--task", "classify", "--train", str(train),
                    "--finetune.attention_dropout", str(config["attention_dropout"]), epochs=1)
    assert kept["attention_dropout"] == config["attention_dropout"]
    with pytest.raises(ConfigError, match="attention_dropout=1.5"):
        load_config(None, ["--model", str(tiny_encoder_dir), "--task", "classify", "--train", str(train),
                           "--finetune.attention_dropout", "1.5"])

"""`lmforge finetune --task classify --method setfit|icl [--shots K]`: few-label classifiers,
evaluated and written like any classify run (results.json, predictions, report).

setfit: RUN/model is an ordinary classify folder (encoder + linear head, pooling "mean").
icl:    RUN/model/fewshot.json names the decoder (path and SHA-256), the template, the
        verbalizers, the demonstrations and the calibration (on content-free inputs, or label
        biases fitted to the shots with --calibrate shots); `IclClassifier.load` reads it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import ConfigError
from lmforge.fileio import save_tensors, write_json
from lmforge.hardware import resolve_precision
from lmforge.recipes.finetune import FinetuneSection, load_backbone, read_splits, write_predictions, write_report
from lmforge.tasks import make_task
from lmforge.tasks.base import label_index
from lmforge.train.dist import Distributed, setup_distributed

CALIBRATION_EXAMPLES = 512  # --calibrate shots without --shots: at most this many training examples


def run_fewshot(config: dict[str, Any], run_dir: Path, progress: bool, claim: Callable[[Distributed], None]
                ) -> dict[str, Any]:
    section: FinetuneSection = config["finetune"]
    if section.method == "setfit":
        return _setfit(config, run_dir, progress, claim)
    if section.method == "prompt":
        return _prompt(config, run_dir, progress, claim)
    return _icl(config, run_dir, progress, claim)


def _verbalizers(section: FinetuneSection, labels: list[str]) -> dict[str, list[str]]:
    if section.verbalizers:
        return {str(k): list(v) for k, v in section.verbalizers.items()}
    if all(label.strip("-").isdigit() for label in labels):
        raise ConfigError([f"method={section.method}: the labels {labels} are numbers; name a word for each with "
                           "--verbalizers '{\"0\": [\"negative\"], \"1\": [\"positive\"]}'"])
    return {label: [label] for label in labels}


def _start(config: dict[str, Any]) -> tuple[float, FinetuneSection, Any, Distributed]:
    """(start time, finetune section, train section, the single CPU process) of a few-shot run."""
    torch.manual_seed(config["train"].seed)
    return time.perf_counter(), config["finetune"], config["train"], setup_distributed("cpu")


def _results(section: FinetuneSection, task: Any, splits: Any, started: float) -> dict[str, Any]:
    return {"task": "classify", "method": section.method, "model": section.model, "shots": section.shots,
            "train_examples": len(splits.examples["train"]), "labels": task.spec.labels,
            "main_metric": task.main_metric, "device": "cpu", "seconds": round(time.perf_counter() - started, 2),
            "max_length": task.options.get("max_length"), **splits.lengths}


def _finish(run_dir: Path, task: Any, splits: Any, results: dict[str, Any],
            predict: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> dict[str, Any]:
    for split in ("validation", "test"):
        if split in splits.examples:
            examples = splits.examples[split]
            predictions = predict(examples)
            results[split] = task.metrics(examples, predictions)
            write_predictions(task, examples, predictions, run_dir / f"predictions-{split}.jsonl")
            task.plots(examples, predictions, run_dir, split)
    write_json(run_dir / "results.json", results)
    write_report(run_dir, results)
    return results


def _setfit(config: dict[str, Any], run_dir: Path, progress: bool, claim: Callable[[Distributed], None]
            ) -> dict[str, Any]:
    from lmforge.checkpoint import save_model
    from lmforge.fewshot.setfit import logistic_head, mean_features, setfit_pairs, tune_encoder
    from lmforge.tasks.loading import load_task_model

    started, section, train, dist = _start(config)
    section = replace(section, pooling="mean")
    model, tokenizer = load_backbone(section.model)
    if getattr(model, "causal", False):
        raise ConfigError([f"method=setfit: {section.model} is a decoder; SetFit tunes a sentence encoder"])
    positions = getattr(model.config, "max_position_embeddings", None)
    task = make_task(section.spec(positions), tokenizer)
    splits = read_splits(section, task, train.seed, positions)
    claim(dist)
    examples = splits.examples["train"]
    pairs = setfit_pairs([str(e["label"]) for e in examples], [str(e["text"]) for e in examples],
                         section.setfit_iterations, train.seed)
    summary = tune_encoder(model, tokenizer, splits.features["train"], pairs, run_dir,
                           epochs=1.0, batch_size=min(train.batch_size, 16), lr=train.lr, seed=train.seed,
                           progress=progress)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    embeddings = mean_features(model, splits.features["train"], pad)
    targets = [label_index(task.spec.labels, e["label"], e) for e in examples]
    weight, bias = logistic_head(embeddings, targets, len(task.spec.labels), train.seed)
    folder = save_model(model, run_dir / "model", tokenizer)
    save_tensors({"out.weight": weight, "out.bias": bias}, folder / "head.safetensors")
    write_json(folder / "task.json", task.spec.to_dict())
    task, objective = load_task_model(folder, "cpu")  # what evaluate / predict / serve will load
    results = _results(section, task, splits, started)
    results.update({"pairs": len(pairs), "steps": int(summary["steps"])})

    autocast = resolve_precision(train.precision, torch.device("cpu")).dtype  # as evaluate / predict will

    def predict(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        _, predictions = task.evaluate(objective, items, task.encode_all(items), section.eval_batch_size,
                                       autocast=autocast)
        return predictions

    return _finish(run_dir, task, splits, results, predict)


def _icl(config: dict[str, Any], run_dir: Path, progress: bool, claim: Callable[[Distributed], None]
         ) -> dict[str, Any]:
    from lmforge.checkpoint import load_pretrained
    from lmforge.fewshot import draw_shots
    from lmforge.fewshot.icl import IclClassifier, IclSettings

    started, section, train, dist = _start(config)
    model, tokenizer = load_pretrained(section.model)
    if not getattr(model, "causal", False) or tokenizer is None:
        raise ConfigError([f"method=icl: {section.model} is not a decoder with a tokenizer (try SmolLM2's .gguf)"])
    task = make_task(section.spec(None), tokenizer)
    splits = read_splits(section, task, train.seed, None)
    labels = task.spec.labels
    verbalizers = _verbalizers(section, labels)
    demonstrations = []
    if section.demonstrations:
        demonstrations = [{"text": str(e["text"]), "label": str(e["label"])}
                          for e in draw_shots(splits.examples["train"], section.demonstrations, train.seed + 1)]
    settings = IclSettings(labels, verbalizers, section.template or IclSettings.template, section.instruction,
                           demonstrations)
    classifier = IclClassifier(model, tokenizer, settings)
    claim(dist)
    calibration = section.calibrate
    if calibration is None:  # the shots' labels are the best evidence of the prompt's label bias
        calibration = "shots" if section.shots is not None else False
    calibration = "content-free" if calibration is True else (calibration or None)
    if calibration == "content-free":
        classifier.calibrate()
    elif calibration == "shots":
        shown = {d["text"] for d in demonstrations}  # an example is not scored after itself
        pool = [e for e in splits.examples["train"] if str(e["text"]) not in shown] or splits.examples["train"]
        if len(pool) > CALIBRATION_EXAMPLES:
            pool = random.Random(f"calibration:{train.seed}").sample(pool, CALIBRATION_EXAMPLES)
        classifier.calibrate_on([str(e["text"]) for e in pool], [str(e["label"]) for e in pool])
    classifier.save(run_dir / "model", section.model, task.spec.to_dict())
    results = _results(section, task, splits, started)
    results.update({"demonstrations": len(demonstrations), "calibration": settings.calibration,
                    "calibrated_on": settings.calibrated_on})

    def predict(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return classifier.predict([str(e["text"]) for e in items])

    return _finish(run_dir, task, splits, results, predict)


def _prompt(config: dict[str, Any], run_dir: Path, progress: bool, claim: Callable[[Distributed], None]
            ) -> dict[str, Any]:
    from lmforge.checkpoint import load_pretrained
    from lmforge.data.loader import BucketedLoader
    from lmforge.fewshot.prompt import PromptClassifier, PromptObjective, require_mlm_head
    from lmforge.train import Trainer

    started, section, train, dist = _start(config)
    model, tokenizer = load_pretrained(section.model, with_mlm_head=True)
    model = require_mlm_head(model, section.model)
    if tokenizer is None:
        raise ConfigError([f"method=prompt: {section.model} has no tokenizer"])
    positions = getattr(model.config, "max_position_embeddings", None)
    task = make_task(section.spec(positions), tokenizer)
    splits = read_splits(section, task, train.seed, positions)
    classifier = PromptClassifier(model, tokenizer, task.spec.labels, _verbalizers(section, task.spec.labels),
                                  section.template or PromptClassifier.template,
                                  int(task.options.get("max_length") or 128))
    claim(dist)
    steps = 0
    if not section.zero_shot:
        rows = [{**classifier.prompt.encode(str(e["text"])), "labels": label_index(task.spec.labels, e["label"], e)}
                for e in splits.examples["train"]]
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        batch_size = min(train.batch_size, len(rows))
        loader = BucketedLoader(rows, batch_size, pad, seed=train.seed)
        settings = replace(train, batch_size=batch_size, eval_every=0, trackers=[],
                           warmup_steps=min(train.warmup_steps, train.steps // 10))
        objective = PromptObjective(model, classifier.prompt)
        objective.train()
        Trainer(objective, loader, settings, run_dir, tokenizer=tokenizer, progress=progress).fit()
        steps = settings.steps
    folder = classifier.save(run_dir / "model", task.spec.to_dict())
    classifier = PromptClassifier.load(folder)  # what evaluate / predict will load
    results = _results(section, task, splits, started)
    results.update({"steps": steps, "zero_shot": section.zero_shot, "template": classifier.prompt.template})

    def predict(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return classifier.predict([str(e["text"]) for e in items])

    return _finish(run_dir, task, splits, results, predict)

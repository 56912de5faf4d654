"""Task models as Hugging Face folders that ``AutoModelFor...`` opens with the same logits.

    classify (pooler pooling)   -> BertForSequenceClassification  (bert.* + classifier)
    pair-score                  -> BertForSequenceClassification  (one logit)
    ner                         -> BertForTokenClassification     (bert.* + classifier)
    qa                          -> BertForQuestionAnswering       (bert.* + qa_outputs; start, end)

On a rotary encoder (position="rope") ner and qa become RoFormerForTokenClassification and
RoFormerForQuestionAnswering (roformer.*); RoFormer's sequence-classification head is not
BERT's pooler, so classify and pair-score models on it go to ONNX instead.

What transformers has no class for (relation extraction with entity markers, [CLS] or
mean pooling, decoder task heads) is refused with the reason, before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.fileio import atomic_directory, save_tensors, write_json
from lmforge.interop.hf import family_of, hf_config
from lmforge.models import Encoder

PROBLEM_TYPES = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
                 "regression": "regression"}


def hf_head_layout(task: Any, backbone: nn.Module) -> tuple[str, str, bool]:
    """(architecture, head prefix, keeps the pooler) for a task model, or a ConfigError
    saying why transformers cannot hold it."""
    name = task.name
    if not isinstance(backbone, Encoder):
        raise ConfigError([f"Hugging Face export of a {name} head holds BERT-family encoders only; this task "
                           f"model is on a {type(backbone).__name__} (export the backbone alone, or use ONNX)"])
    kind = "RoFormer" if backbone.config.position == "rope" else "Bert"
    if name in ("classify", "pair-score"):
        if kind == "RoFormer":
            raise ConfigError([f"transformers' RoFormerForSequenceClassification has its own head (dense + "
                               f"{backbone.config.hidden_act} on [CLS]), not BERT's pooler: export this {name} "
                               "model to ONNX, or its backbone alone to Hugging Face"])
        pooling = str(task.options.get("pooling", "auto"))
        uses_pooler = pooling == "pooler" or (pooling == "auto" and backbone.pooler is not None)
        if not uses_pooler:
            raise ConfigError([f"task.pooling={pooling}: BertForSequenceClassification classifies the pooler "
                               "output; fine-tune with --pooling pooler (the default when the encoder has a "
                               "pooler) to export to Hugging Face, or export to ONNX"])
        return "BertForSequenceClassification", "classifier", True
    if name == "ner":
        return f"{kind}ForTokenClassification", "classifier", False
    if name == "qa":
        return f"{kind}ForQuestionAnswering", "qa_outputs", False
    raise ConfigError([f"transformers has no model class for lmforge's {name} head"
                       " (entity-marker pairs); export it to ONNX instead"])


def save_hf_task(task: Any, backbone: nn.Module, head: nn.Module, folder: str | Path, tokenizer: Any) -> Path:
    """Write the task model as a Hugging Face folder (atomic)."""
    architecture, prefix, keep_pooler = hf_head_layout(task, backbone)
    state = {k: v.detach() for k, v in backbone.state_dict().items()}
    if not keep_pooler:
        state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    tensors = family_of(backbone).to_theirs(state, backbone.config)
    tensors[f"{prefix}.weight"] = head.out.weight.detach().clone()  # type: ignore[union-attr]
    tensors[f"{prefix}.bias"] = head.out.bias.detach().clone()  # type: ignore[union-attr]
    config = {**hf_config(backbone), "architectures": [architecture]}
    labels = list(task.spec.labels)
    if task.name == "ner" or (task.name == "classify" and task.problem != "regression"):
        config["id2label"] = {str(i): label for i, label in enumerate(labels)}
        config["label2id"] = {label: i for i, label in enumerate(labels)}
    if task.name == "classify":
        config["problem_type"] = PROBLEM_TYPES[task.problem]
        config["num_labels"] = 1 if task.problem == "regression" else len(labels)
    elif task.name == "pair-score":
        config["num_labels"] = 1
    elif task.name == "qa":
        config["num_labels"] = 2
    folder = Path(folder)
    with atomic_directory(folder) as tmp:
        save_tensors({k: v.contiguous() for k, v in tensors.items()}, tmp / "model.safetensors",
                     metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        tokenizer.save_hf(tmp)
        write_json(tmp / "lmforge_task.json", task.spec.to_dict())  # lmforge's own view, for the way back
        crf = getattr(task, "crf", None)
        if crf is not None:  # transformers reads the emissions; lmforge's CRF transitions travel beside them
            crf.save(tmp / "lmforge_crf.safetensors")
    return folder


def hf_logits(output: Any, task_name: str) -> torch.Tensor:
    """transformers' output in lmforge's score layout (QA: (B, T, 2) start/end)."""
    if task_name == "qa":
        return torch.stack([output.start_logits, output.end_logits], dim=-1)
    logits = output.logits
    return logits.squeeze(-1) if task_name == "pair-score" else logits

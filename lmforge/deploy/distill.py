"""Task distillation: a small student learns a fine-tuned teacher's outputs.

    loss = w_soft     * T^2 KL(teacher/T || student/T)          the task's scores, at temperature T
         + w_hidden   * MSE(P h_student_i, h_teacher_m(i))         mapped layers (P: a learned
                                                                    projection when widths differ)
         + w_relation * sum_{x in q,k,v} KL(R_teacher^x || R_student^x)
                                                                    MiniLM-v2 self-attention relations
                                                                    of the last layer, R = softmax(x x^T / sqrt(d_r))
                                                                    over r relation heads

The soft loss follows the task's output: a softmax over classes (classification, relation,
per-token NER tags), over positions (QA start and end), a sigmoid (multi-label, pairs) or
a squared error (regression). No labels are needed, so unlabeled text in the task's input
format serves as transfer data. A student of K layers taken from the teacher (embeddings,
pooler, head and evenly spaced layers ending at the last, as DistilBERT) starts close; a
preset student starts from scratch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.loader import BucketedLoader
from lmforge.deploy.prune import short_training
from lmforge.errors import ConfigError
from lmforge.models import Encoder, EncoderConfig, preset
from lmforge.models.encoder import Packing


@dataclass
class DistillWeights:
    soft: float = 1.0
    hidden: float = 1.0
    relation: float = 1.0
    temperature: float = 2.0


def teacher_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, ending at the last one (6 -> 2: [2, 5])."""
    if not 1 <= student_layers <= teacher_layers:
        raise ConfigError([f"student_layers={student_layers}: must be between 1 and the teacher's {teacher_layers}"])
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


@torch.no_grad()
def student_from_teacher(teacher: Encoder, layers: int) -> Encoder:
    """A K-layer encoder holding the teacher's embeddings, pooler and chosen layers."""
    chosen = teacher_layers(teacher.config.num_layers, layers)
    values = teacher.config.to_dict()
    values["num_layers"] = layers
    for name in ("heads_per_layer", "intermediate_per_layer"):
        if values[name]:
            values[name] = [values[name][i] for i in chosen]
    student = Encoder(EncoderConfig.from_dict(values))
    student.embeddings.load_state_dict(teacher.embeddings.state_dict())
    if student.pooler is not None and teacher.pooler is not None:
        student.pooler.load_state_dict(teacher.pooler.state_dict())
    for mine, theirs in enumerate(chosen):
        student.layers[mine].load_state_dict(teacher.layers[theirs].state_dict())
    return student


def student_from_preset(teacher: Encoder, name: str) -> Encoder:
    config = teacher.config
    values = preset(name).to_dict()
    if values.get("family") != "encoder":
        raise ConfigError([f"student={name}: a BERT-family preset is needed to distil an encoder"])
    values.update(vocab_size=config.vocab_size, max_position_embeddings=config.max_position_embeddings,
                  type_vocab_size=config.type_vocab_size, pad_token_id=config.pad_token_id,
                  add_pooler=config.add_pooler)
    return Encoder(EncoderConfig.from_dict(values))


class _Taps:
    """Forward hooks that keep each layer's output and the last layer's q, k, v."""

    def __init__(self, model: Encoder) -> None:
        self.hidden: list[torch.Tensor] = []
        self.qkv: list[torch.Tensor] = []
        self.handles = [layer.register_forward_hook(lambda _m, _i, out: self.hidden.append(out))
                        for layer in model.layers]
        last = model.layers[-1].attention
        self.handles += [linear.register_forward_hook(lambda _m, _i, out: self.qkv.append(out))
                         for linear in (last.query, last.key, last.value)]

    def clear(self) -> None:
        self.hidden, self.qkv = [], []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def soft_loss(task: Any, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None,
              temperature: float) -> torch.Tensor:
    """The task-shaped distillation loss between score tensors (already at T=1)."""
    t = temperature
    problem = getattr(task, "problem", "single_label")
    if task.name == "qa":  # (B, T, 2): a distribution over positions for start and for end
        assert mask is not None
        hide = (mask == 0).unsqueeze(-1)
        student, teacher = student.masked_fill(hide, -1e4), teacher.masked_fill(hide, -1e4)
        return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                        reduction="sum") / (student.shape[0] * 2) * t * t
    if task.name == "pair-score" or problem == "multi_label":
        return F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t)) * t * t
    if problem == "regression":
        return F.mse_loss(student, teacher)
    if student.dim() == 3:  # per-token tags: real tokens only
        assert mask is not None
        keep = mask.bool()
        student, teacher = student[keep], teacher[keep]
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction="batchmean") * t * t


def relation_loss(student_qkv: list[torch.Tensor], teacher_qkv: list[torch.Tensor], mask: torch.Tensor,
                  heads: int) -> torch.Tensor:
    """MiniLM-v2: KL between the q-q, k-k and v-v relation matrices of teacher and student."""
    packing = Packing(mask) if not bool(mask.all()) else None
    keys_hidden = (mask == 0)[:, None, None, :]  # (B, 1, 1, T)
    total = mask.new_zeros((), dtype=torch.float32)
    for mine, theirs in zip(student_qkv, teacher_qkv, strict=True):
        relations = []
        for x in (mine, theirs):
            if x.dim() == 2 and packing is not None:
                x = packing.pad(x)  # (B, T, H)
            B, T, H = x.shape
            x = x.view(B, T, heads, H // heads).transpose(1, 2)  # (B, r, T, d_r)
            scores = x @ x.transpose(-1, -2) / math.sqrt(H // heads)
            relations.append(F.log_softmax(scores.masked_fill(keys_hidden, -1e4), -1))
        kl = F.kl_div(relations[0], relations[1], log_target=True, reduction="none").sum(-1)  # (B, r, T)
        real = mask[:, None, :].to(kl.dtype)
        total = total + (kl * real).sum() / (real.sum() * heads)
    return total


def relation_heads(student: Encoder, teacher: Encoder) -> int:
    """Relation heads that divide both widths (the teacher's head count where it can)."""
    widths = (student.layers[-1].attention.query.out_features, teacher.layers[-1].attention.query.out_features)
    for heads in (teacher.config.num_heads, student.config.num_heads, math.gcd(*widths)):
        if all(w % heads == 0 for w in widths):
            return heads
    return 1


def distill(teacher: Any, student: Any, task: Any, features: Sequence[dict[str, Any]], steps: int, lr: float,
            weights: DistillWeights, batch_size: int = 32, seed: int = 0, progress: bool = False) -> list[float]:
    """Train ``student`` (a task objective) to match ``teacher`` (frozen); returns the losses."""
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    t_model, s_model = teacher.model, student.model
    mapped = teacher_layers(t_model.config.num_layers, s_model.config.num_layers)
    projection: nn.Module = nn.Identity()
    if s_model.config.hidden_size != t_model.config.hidden_size:
        projection = nn.Linear(s_model.config.hidden_size, t_model.config.hidden_size)
    heads = relation_heads(s_model, t_model)
    parameters = [p for p in student.parameters() if p.requires_grad] + list(projection.parameters())
    pad_id = task.tokenizer.pad_id if task.tokenizer.pad_id is not None else 0
    loader = BucketedLoader(list(features), batch_size, pad_id, shuffle=True, seed=seed)
    teacher_taps, student_taps = _Taps(t_model), _Taps(s_model)

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        teacher_taps.clear()
        student_taps.clear()
        with torch.no_grad():
            target = teacher(batch, scores_only=True)
        scores = student(batch, scores_only=True)
        loss = weights.soft * soft_loss(task, scores, target, mask, weights.temperature)
        if weights.hidden:
            hidden = sum(F.mse_loss(projection(student_taps.hidden[i]), teacher_taps.hidden[m])
                         for i, m in enumerate(mapped))
            loss = loss + weights.hidden * hidden / len(mapped)
        if weights.relation:
            loss = loss + weights.relation * relation_loss(student_taps.qkv, teacher_taps.qkv, mask, heads)
        return loss

    student.train()
    try:
        losses = short_training(parameters, loader, steps, lr, loss_of, "distillation", warmup=max(1, steps // 10),
                                progress=progress)
    finally:
        teacher_taps.remove()
        student_taps.remove()
    student.eval()
    return losses


def build_student(teacher_objective: Any, task: Any, student_layers: int | None, student_preset: str | None) -> Any:
    """The student task objective: teacher layers (head copied) or a preset (fresh head)."""
    teacher = teacher_objective.model
    if not isinstance(teacher, Encoder):
        raise ConfigError([f"distillation holds fine-tuned BERT-family encoders; the teacher is a {type(teacher).__name__}"])
    if (student_layers is None) == (student_preset is None):
        raise ConfigError(["give exactly one of --student-layers K (a student from the teacher's layers) and "
                           "--student PRESET (a fresh student)"])
    if student_layers is not None:
        backbone = student_from_teacher(teacher, student_layers)
        head = copy.deepcopy(teacher_objective.head)
    else:
        backbone = student_from_preset(teacher, str(student_preset))
        head = task.build_head(backbone)
    objective = type(teacher_objective)(task, backbone, head)
    for parameter in objective.parameters():
        parameter.requires_grad_(True)
    return objective

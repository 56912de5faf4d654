"""Pruning: structured for encoders (heads and FFN neurons physically removed), Wanda-style
unstructured for decoders.

Structured (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"): every head
and FFN neuron gets a gate g = 1 that multiplies its output; the importance of a unit is
E|dL/dg| over the task's labeled data, normalised per layer (l2), and the least important
units across all layers are removed. Removal is physical: the q/k/v rows and output
columns of a head, the intermediate row and output column of a neuron, so the smaller
matrices are real and so is the speed. A short recovery fine-tune follows.

Wanda (Sun et al. 2023): a decoder weight W_ij scores |W_ij| * ||X_j||_2 over calibration
tokens; each output row keeps its highest-scoring (1 - sparsity) weights. The zeros stay
in dense matrices: this shrinks nothing and speeds nothing up without sparse kernels, and
the summary says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lmforge.data.loader import BucketedLoader
from lmforge.errors import ConfigError
from lmforge.models import Encoder, EncoderConfig


# ----------------------------------------------------------------------------- structured
def unit_importance(objective: Any, task: Any, features: Sequence[dict[str, Any]], batch_size: int = 16,
                    max_examples: int = 512, progress: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer (head scores (nh,), neuron scores (I,)): E|dL/dgate|, each layer's scores
    divided by their l2 norm (as Michel et al.)."""
    backbone: Encoder = objective.model
    heads = [torch.ones(layer.attention.num_heads, requires_grad=True) for layer in backbone.layers]
    neurons = [torch.ones(layer.intermediate.out_features, requires_grad=True) for layer in backbone.layers]
    head_sum = [torch.zeros_like(h) for h in heads]
    neuron_sum = [torch.zeros_like(n) for n in neurons]
    trainable = [p for p in objective.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)  # only the gates need gradients
    for layer, head, neuron in zip(backbone.layers, heads, neurons, strict=True):
        layer.attention.head_mask, layer.ffn_mask = head, neuron
    was_training = objective.training
    objective.eval()  # no dropout: the same data gives the same scores
    pad_id = task.tokenizer.pad_id if task.tokenizer.pad_id is not None else 0
    chosen = list(features)[:max_examples]
    loader = BucketedLoader(chosen, batch_size, pad_id, shuffle=False)
    try:
        for batch in tqdm(loader, total=len(loader.epoch_batches(0)), disable=not progress, desc="importance",
                          unit="batch", leave=False):
            scores = objective(batch, scores_only=True)
            loss, _ = task.loss(scores, batch)
            (loss / max(task.count(batch), 1)).backward()
            for total, gate in zip(head_sum + neuron_sum, heads + neurons, strict=True):
                total += gate.grad.abs()  # type: ignore[union-attr]
                gate.grad = None
    finally:
        for layer in backbone.layers:
            layer.attention.head_mask, layer.ffn_mask = None, None
        for parameter in trainable:
            parameter.requires_grad_(True)
        objective.train(was_training)
    return [s / s.norm().clamp(min=1e-12) for s in head_sum], [s / s.norm().clamp(min=1e-12) for s in neuron_sum]


def choose_removals(scores: list[torch.Tensor], fraction: float, what: str) -> list[list[int]]:
    """Indices to remove per layer: the ``fraction`` least important units across all layers,
    keeping at least one per layer; impossible requests are a ConfigError naming the limit."""
    total = sum(len(s) for s in scores)
    count = round(fraction * total)
    if not 0.0 <= fraction < 1.0:
        raise ConfigError([f"{what}={fraction}: must be a fraction in [0, 1) of the {total} {what} in the model"])
    most = total - len(scores)
    if count > most:
        raise ConfigError([f"{what}={fraction}: removing {count} of {total} {what} would empty a layer; at most "
                           f"{most} ({most / total:.2f}) can go while every layer keeps one"])
    order = sorted(((float(v), layer, index) for layer, s in enumerate(scores) for index, v in enumerate(s)))
    removed: list[list[int]] = [[] for _ in scores]
    for _, layer, index in order:
        if count == 0:
            break
        if len(scores[layer]) - len(removed[layer]) > 1:
            removed[layer].append(index)
            count -= 1
    return [sorted(r) for r in removed]


@torch.no_grad()
def prune_encoder(model: Encoder, heads: list[list[int]], neurons: list[list[int]]) -> Encoder:
    """A new, smaller encoder without the given heads and FFN neurons (per layer)."""
    config: EncoderConfig = model.config
    kept_heads = [[h for h in range(layer.attention.num_heads) if h not in set(heads[i])]
                  for i, layer in enumerate(model.layers)]
    kept_neurons = [[n for n in range(layer.intermediate.out_features) if n not in set(neurons[i])]
                    for i, layer in enumerate(model.layers)]
    values = {**config.to_dict(), "heads_per_layer": [len(k) for k in kept_heads],
              "intermediate_per_layer": [len(k) for k in kept_neurons]}
    if all(n == config.num_heads for n in values["heads_per_layer"]):
        values["heads_per_layer"] = None
    if all(n == config.intermediate_size for n in values["intermediate_per_layer"]):
        values["intermediate_per_layer"] = None
    smaller = Encoder(EncoderConfig.from_dict(values))
    state = model.state_dict()
    new_state = {}
    hd = config.head_dim
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] != "layers":
            new_state[key] = tensor
            continue
        layer, rest = int(parts[1]), ".".join(parts[2:])
        rows = torch.tensor([h * hd + j for h in kept_heads[layer] for j in range(hd)], dtype=torch.long)
        units = torch.tensor(kept_neurons[layer], dtype=torch.long)
        if rest.startswith(("attention.query.", "attention.key.", "attention.value.")):
            tensor = tensor.index_select(0, rows)
        elif rest == "attention.output.weight":
            tensor = tensor.index_select(1, rows)
        elif rest.startswith("intermediate."):
            tensor = tensor.index_select(0, units)
        elif rest == "output.weight":
            tensor = tensor.index_select(1, units)
        new_state[key] = tensor.clone()
    smaller.load_state_dict(new_state)
    return smaller.train(model.training)


def short_training(parameters: list[torch.Tensor], batches: BucketedLoader, steps: int, lr: float,
                   loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor], desc: str, warmup: int = 0,
                   progress: bool = False) -> list[float]:
    """``steps`` AdamW steps (weight decay 0.01, gradients clipped at 1, linear warm-up over
    ``warmup`` steps then linear decay to 0) over the loader's epochs; returns the losses.
    The one loop of recovery fine-tuning and distillation."""
    if not batches.epoch_batches(0):
        raise ConfigError([f"{desc} needs at least {batches.batch_size} examples; the data has "
                           f"{len(batches.examples)}"])
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup if warmup else 1.0, max(0.0, (steps - step) / max(1, steps - warmup))))
    losses: list[float] = []
    epoch = 0
    with tqdm(total=steps, disable=not progress, desc=desc, unit="step", leave=False) as bar:
        while len(losses) < steps:
            for index in range(len(batches.epoch_batches(epoch))):
                loss = loss_of(batches.batch_at(epoch, index))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if len(losses) >= steps:
                    break
            epoch += 1
    return losses


def recover(objective: Any, task: Any, features: Sequence[dict[str, Any]], steps: int, lr: float,
            batch_size: int = 16, seed: int = 0, progress: bool = False) -> list[float]:
    """A short fine-tune of backbone and head on the task loss (AdamW, linear decay); the losses."""
    if steps <= 0:
        return []
    pad_id = task.tokenizer.pad_id if task.tokenizer.pad_id is not None else 0
    loader = BucketedLoader(list(features), batch_size, pad_id, shuffle=True, seed=seed)

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss, _ = task.loss(objective(batch, scores_only=True), batch)
        return loss / max(task.count(batch), 1)  # type: ignore[no-any-return]

    objective.train()
    losses = short_training([p for p in objective.parameters() if p.requires_grad], loader, steps, lr, loss_of,
                            "recover", progress=progress)
    objective.eval()
    return losses


# ----------------------------------------------------------------------------- Wanda (decoders)
@torch.no_grad()
def wanda(model: nn.Module, batches: Sequence[torch.Tensor], sparsity: float = 0.5) -> dict[str, float]:
    """Zero the ``sparsity`` fraction of each decoder-layer Linear's weights with the lowest
    |W| * ||X||_2 per output row; ``batches`` are (1, T) token ids for calibration."""
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError([f"sparsity={sparsity}: must be a fraction in [0, 1)"])
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.startswith("layers.")}
    norms = {name: torch.zeros(module.in_features) for name, module in linears.items()}
    hooks = []
    for name, module in linears.items():
        def accumulate(_: nn.Module, inputs: tuple[torch.Tensor, ...], name: str = name) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            norms[name] += (x * x).sum(0)
        hooks.append(module.register_forward_pre_hook(accumulate))
    try:
        for ids in batches:
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    zeroed = 0
    total = 0
    for name, module in linears.items():
        score = module.weight.abs() * norms[name].sqrt()[None, :]
        drop = int(module.in_features * sparsity)
        if drop:
            lowest = score.topk(drop, dim=1, largest=False).indices
            module.weight.scatter_(1, lowest, 0.0)
        zeroed += drop * module.out_features
        total += module.weight.numel()
    return {"sparsity": zeroed / max(total, 1), "pruned_weights": float(zeroed)}


@torch.no_grad()
def perplexity(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """exp(mean next-token cross-entropy) over (1, T) token-id batches."""
    total, count = 0.0, 0
    for ids in batches:
        logits = model.logits(model(ids))[0, :-1].float()  # type: ignore[operator]
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(total / max(count, 1))


def token_batches(tokenizer: Any, texts: Sequence[str], length: int, limit: int) -> list[torch.Tensor]:
    """Texts joined and cut into ``limit`` windows of ``length`` tokens (1, length)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        if tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
        if len(ids) >= length * limit:
            break
    windows = [torch.tensor([ids[i:i + length]]) for i in range(0, len(ids) - length + 1, length)][:limit]
    if not windows:
        raise ConfigError([f"the calibration text holds {len(ids)} tokens; at least {length} are needed"])
    return windows

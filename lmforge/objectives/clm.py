"""Causal language modelling on packed sequences, with a chunked vocabulary loss.

``linear_cross_entropy`` computes sum(CE(hidden @ W.T, targets)) a chunk of rows at a
time and produces the gradients for ``hidden`` and ``W`` during the forward pass, so the
full [tokens x vocab] logits (and their fp32 softmax) never exist at once: at 4,096
tokens x 50,257 vocabulary that is 823 MB of fp32 logits that are never allocated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lmforge.data.loader import IGNORE_INDEX
from lmforge.models import Decoder
from lmforge.objectives.base import Objective, ObjectiveOutput, Prepared


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
        chunk_rows: int, compute_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if needs_bias else None
        w = weight.to(compute_dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        # One fp32 buffer holds every chunk's logits, then their softmax, then their gradients,
        # all in place: a fresh 200 MB buffer per chunk costs more in page faults than the softmax.
        # Logits are laid out (V, n), vocabulary first: W @ h.T ran 1.5-1.8x faster than h @ W.T
        # on the 2-core machines here (benchmarks/train.py), and nothing else got slower.
        vocabulary = weight.shape[0]
        storage = torch.empty(vocabulary * min(chunk_rows, hidden.shape[0]), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows].to(compute_dtype)  # (n, H)
            t = targets[start : start + chunk_rows]  # (n,)
            n = h.shape[0]
            valid = t != IGNORE_INDEX
            safe = torch.where(valid, t, torch.zeros_like(t))
            columns = torch.arange(n, device=t.device)
            logits = storage[: vocabulary * n].view(vocabulary, n)  # (V, n)
            if compute_dtype == torch.float32:
                torch.mm(w, h.t(), out=logits)
            else:
                logits.copy_(w @ h.t())
            if bias is not None:
                logits.add_(bias.float()[:, None])
            picked = logits[safe, columns]  # (n,) the target's logit
            top = logits.amax(dim=0)  # (n,)
            correct += ((picked >= top) & valid).sum()  # the target holds the largest logit
            probs = logits.sub_(top).exp_()  # exp(logit - max), in place
            total = probs.sum(dim=0)
            loss += ((top + total.log() - picked) * valid).sum()  # log-sum-exp - target logit
            if needs_hidden or needs_weight or needs_bias:
                probs.div_(total)  # softmax
                probs[safe, columns] -= 1.0  # d CE / d logits = softmax - one-hot
                if not bool(valid.all()):
                    probs[:, ~valid] = 0.0
                if needs_bias:
                    grad_bias += probs.sum(dim=1)  # type: ignore[operator]
                grad_logits = probs.to(compute_dtype)  # (V, n)
                if needs_hidden:
                    grad_hidden[start : start + n] = (grad_logits.t() @ w).to(hidden.dtype)  # type: ignore[index]
                if needs_weight:
                    if compute_dtype == torch.float32:
                        grad_weight.addmm_(grad_logits, h)  # type: ignore[union-attr]
                    else:
                        grad_weight.add_((grad_logits @ h).float())  # type: ignore[union-attr]
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_correct: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (
            grad_hidden * grad_loss if grad_hidden is not None else None,
            (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None,
            (grad_bias * grad_loss).to(ctx.bias_dtype) if grad_bias is not None else None,
            None, None, None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 1024,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE over targets != -100, number of correct argmax) for logits hidden @ W.T (+ bias).

    hidden: (N, H); weight: (V, H); bias: (V,) or None; targets: (N,). Matmuls run in bf16
    when called under bf16 autocast, the softmax always in fp32.
    """
    compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else hidden.dtype
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows, compute_dtype)  # type: ignore[no-any-return]


def document_ids(input_ids: torch.Tensor, separator_id: int) -> torch.Tensor:
    """(B, T) document index of each token; a separator belongs to the document it closes."""
    is_separator = (input_ids == separator_id).long()
    return is_separator.cumsum(1) - is_separator


class CausalLMObjective(Objective):
    """Next-token prediction on packed blocks: position t predicts token t+1."""

    def __init__(self, model: Decoder, separator_id: int | None = None, document_mask: bool = False,
                 chunk_rows: int = 1024) -> None:
        super().__init__()
        if document_mask and separator_id is None:
            raise ValueError("document_mask needs the separator id that ends each document")
        self.model = model
        self.separator_id = separator_id
        self.document_mask = document_mask
        self.chunk_rows = chunk_rows

    def prepare(self, batch: dict[str, torch.Tensor], generators: Sequence[torch.Generator]) -> Prepared:
        ids = batch["input_ids"]
        labels = ids[:, 1:].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"][:, 1:] == 0] = IGNORE_INDEX
        if "labels" in batch:  # e.g. prompt tokens already set to -100 by a task
            labels = batch["labels"][:, 1:]
        return {**batch, "targets": labels}, {"clm": int((labels != IGNORE_INDEX).sum())}

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:  # type: ignore[override]
        ids = batch["input_ids"]
        documents = document_ids(ids, self.separator_id) if self.document_mask else None  # type: ignore[arg-type]
        hidden = self.model(ids, batch.get("attention_mask"), document_ids=documents)  # (B, T, H)
        rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B (T-1), H)
        loss, correct = linear_cross_entropy(rows, self.model.output_weight, batch["targets"].reshape(-1),
                                             self.chunk_rows)
        return ObjectiveOutput({"clm": loss}, {"clm_correct": float(correct)})

    def flops_per_token(self) -> float:
        linear = sum(m.weight.numel() for m in self.modules() if isinstance(m, torch.nn.Linear))
        if self.model.config.tie_embeddings:  # the tied projection is not a Linear module
            linear += self.model.config.vocab_size * self.model.config.hidden_size
        return 6.0 * linear


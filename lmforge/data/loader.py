"""Batches for training: packed LM blocks, sentence pairs (NSP/SOP), bucketed labeled data.

Every loader is a pure function of (seed, epoch, batch index): the order of an epoch is
a permutation drawn from ``numpy.random.default_rng([seed, epoch])``. So the state a
checkpoint needs is just ``{"epoch", "batch"}`` and a resumed run sees exactly the
batches it would have seen. Under torchrun each rank takes a disjoint, equal share of
every epoch, so ranks stay in step: the k-th batch of rank r of w is the r-th slice of
the k-th *global* batch (k * w * b ... (k + 1) * w * b of the epoch order). So w ranks
with batch b see exactly the rows that one process sees with w micro-batches of b, and
a distributed step can be checked against a single process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from lmforge.data.shards import TokenShards
from lmforge.errors import DataError

IGNORE_INDEX = -100


class _Resumable:
    """Epoch/batch bookkeeping shared by the loaders."""

    seed: int
    epoch: int = 0
    batch: int = 0

    batch_size: int
    world_size: int = 1

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "batch": self.batch,
                "global_batch": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where ``state`` stopped, also when it was saved by another number of
        ranks: the position is kept in rows of the epoch (global batches are slices of one
        epoch order, so the rows that follow are the same)."""
        if state.get("seed", self.seed) != self.seed:
            raise DataError(f"loader state was saved with seed {state['seed']}, this loader has seed {self.seed}")
        own = self.batch_size * self.world_size
        rows = int(state["batch"]) * int(state.get("global_batch", own))
        if rows % own:
            raise DataError(f"the checkpoint stopped after {rows} rows of the epoch, which is not a whole number of "
                            f"this run's global batches of {own}: keep the global batch size when resuming")
        self.epoch, self.batch = int(state["epoch"]), rows // own

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def batches_per_epoch(self) -> int:
        raise NotImplementedError

    def batch_at(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from the saved position on, epoch after epoch (the caller stops)."""
        if self.batches_per_epoch == 0:
            raise DataError("the data is too small for one batch per rank; lower batch_size or seq_len")
        while True:
            while self.batch < self.batches_per_epoch:
                batch = self.batch_at(self.epoch, self.batch)
                self.batch += 1
                yield batch
            self.epoch, self.batch = self.epoch + 1, 0


def rank_slice(order: np.ndarray, index: int, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """Rows of this rank's ``index``-th batch: its slice of the index-th global batch."""
    start = index * batch_size * world_size + rank * batch_size
    return order[start : start + batch_size]


class PackedLoader(_Resumable):
    """Fixed-length blocks cut from the token stream (documents joined by separators).

    For encoders pass ``cls_id``/``sep_id``: each block becomes [CLS] content [SEP].
    Batches hold ``input_ids`` (B, seq_len) as int64.
    """

    def __init__(
        self,
        shards: TokenShards,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        cls_id: int | None = None,
        sep_id: int | None = None,
    ) -> None:
        if (cls_id is None) != (sep_id is None):
            raise ValueError("give both cls_id and sep_id, or neither")
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.cls_id, self.sep_id = cls_id, sep_id
        self.content = seq_len - (2 if cls_id is not None else 0)
        if self.content < 1:
            raise ValueError(f"seq_len={seq_len} leaves no room for content")
        self.num_blocks = len(shards) // self.content

    @property
    def batches_per_epoch(self) -> int:
        return self.num_blocks // (self.batch_size * self.world_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_blocks)
        if getattr(self, "_order_epoch", None) != epoch:
            self._order_epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)
        return self._order

    def block_ids(self, epoch: int, index: int) -> np.ndarray:
        """The global block numbers of one batch (used by tests to check coverage)."""
        return rank_slice(self.epoch_order(epoch), index, self.batch_size, self.rank, self.world_size)

    def batch_at(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """``input_ids`` (B, T) int64, and ``word_starts`` (B, T) bool when the shards
        store word boundaries ([CLS]/[SEP] count as words of their own)."""
        rows = np.empty((self.batch_size, self.seq_len), dtype=np.int64)
        has_words = self.shards.word_start_arrays is not None
        starts = np.ones((self.batch_size, self.seq_len), dtype=bool) if has_words else None
        offset = 1 if self.cls_id is not None else 0
        for row, block in enumerate(self.block_ids(epoch, index)):
            start = int(block) * self.content
            rows[row, offset : offset + self.content] = self.shards.tokens(start, start + self.content)
            if starts is not None:
                starts[row, offset : offset + self.content] = self.shards.word_starts(start, start + self.content)
                starts[row, offset] = True  # a block may begin mid-word
        if self.cls_id is not None:
            rows[:, 0], rows[:, -1] = self.cls_id, self.sep_id
        batch = {"input_ids": torch.from_numpy(rows)}
        if starts is not None:
            batch["word_starts"] = torch.from_numpy(starts)
        return batch


class SentencePairLoader(_Resumable):
    """[CLS] A [SEP] B [SEP] pairs from documents, for next-sentence (NSP) or
    sentence-order (SOP) prediction.

    A and B are two consecutive segments of one document, split at a random point.
    NSP: half the time B is replaced by a segment of another document (label 1).
    SOP: half the time A and B are swapped (label 1). Label 0 means "in order".
    """

    def __init__(
        self,
        shards: TokenShards,
        seq_len: int,
        batch_size: int,
        cls_id: int,
        sep_id: int,
        pad_id: int,
        task: str = "sop",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if task not in ("nsp", "sop"):
            raise ValueError(f"task={task!r}: must be 'nsp' or 'sop'")
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.cls_id, self.sep_id, self.pad_id, self.task = cls_id, sep_id, pad_id, task
        self.seed, self.rank, self.world_size = seed, rank, world_size
        lengths = np.diff(shards.document_starts) - (1 if shards.separator_id is not None else 0)
        self.documents = np.flatnonzero(lengths >= 2)  # a pair needs two non-empty segments
        self.lengths = lengths

    @property
    def batches_per_epoch(self) -> int:
        return len(self.documents) // (self.batch_size * self.world_size)

    def _content(self, document: int) -> np.ndarray:
        tokens = self.shards.document(int(document))
        return tokens[:-1] if self.shards.separator_id is not None else tokens

    def batch_at(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.documents)
        chosen = rank_slice(order, index, self.batch_size, self.rank, self.world_size)
        budget = self.seq_len - 3
        ids = np.full((self.batch_size, self.seq_len), self.pad_id, dtype=np.int64)
        types = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        labels = np.zeros(self.batch_size, dtype=np.int64)
        first = index * self.batch_size * self.world_size + self.rank * self.batch_size
        for row, document in enumerate(chosen):
            rng = np.random.default_rng([self.seed, epoch, first + row])  # keyed by position in the epoch
            tokens = self._content(document)
            start = int(rng.integers(0, max(1, len(tokens) - budget + 1)))
            span = tokens[start : start + budget]
            cut = int(rng.integers(1, len(span)))
            first, second = span[:cut], span[cut:]
            if rng.random() < 0.5:
                labels[row] = 1
                if self.task == "sop":
                    first, second = second, first
                else:
                    pick = int(rng.integers(len(self.documents) - 1))  # any document but this one
                    pick += pick >= int(np.searchsorted(self.documents, document))
                    replacement = self._content(self.documents[pick])
                    second = replacement[: len(second)]
            pair = np.concatenate([[self.cls_id], first, [self.sep_id], second, [self.sep_id]])
            ids[row, : len(pair)] = pair
            types[row, len(first) + 2 : len(pair)] = 1
            mask[row, : len(pair)] = 1
        return {"input_ids": torch.from_numpy(ids), "token_type_ids": torch.from_numpy(types),
                "attention_mask": torch.from_numpy(mask), "pair_labels": torch.from_numpy(labels)}


def pad_batch(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Collate encoded examples: ``input_ids`` padded with ``pad_id`` (attention_mask
    added), ``token_type_ids`` padded with 0, integer lists (token labels) padded with
    -100, float lists (multi-label targets, all one length) and scalars stacked; keys
    starting with ``_`` and other values stay out of the batch."""
    width = max(len(e["input_ids"]) for e in examples)
    batch: dict[str, torch.Tensor] = {}
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        ids[row, :length] = torch.as_tensor(example["input_ids"])
        mask[row, :length] = 1
    batch["input_ids"], batch["attention_mask"] = ids, mask
    for key in examples[0]:
        if key in ("input_ids", "attention_mask") or key.startswith("_"):
            continue
        values = [e[key] for e in examples]
        if isinstance(values[0], (list, tuple, np.ndarray)):
            if len(values[0]) and isinstance(values[0][0], (float, np.floating)):  # fixed-size float vectors
                batch[key] = torch.tensor(np.asarray(values, dtype=np.float32))
                continue
            fill = 0 if key == "token_type_ids" else IGNORE_INDEX
            padded = torch.full((len(examples), width), fill, dtype=torch.long)
            for row, value in enumerate(values):
                padded[row, : len(value)] = torch.as_tensor(value)
            batch[key] = padded
        elif isinstance(values[0], (int, float, bool, np.integer, np.floating)):
            batch[key] = torch.tensor(values)
    return batch


class BucketedLoader(_Resumable):
    """Padded batches of labeled examples, grouped by length to waste little padding.

    Each epoch: shuffle, take groups of ``bucket_batches`` batches, sort each group by
    length, cut into batches, shuffle the batch order. ``shuffle=False`` (evaluation)
    keeps the examples in length order and keeps the last, smaller batch; each batch
    then carries ``index`` (positions in ``examples``) to restore the original order.
    """

    def __init__(
        self,
        examples: Sequence[dict[str, Any]],
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        bucket_batches: int = 50,
    ) -> None:
        if not examples:
            raise DataError("no examples to batch")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.bucket_batches = bucket_batches
        self.lengths = np.array([len(e["input_ids"]) for e in examples])
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The batches (arrays of example positions) this rank sees in ``epoch``."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._make_batches(epoch))
        return self._cached[1]

    def _make_batches(self, epoch: int) -> list[np.ndarray]:
        if not self.shuffle:
            order = np.argsort(self.lengths, kind="stable")
            batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            return batches[self.rank :: self.world_size]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.examples))
        group = self.batch_size * self.bucket_batches
        batches = []
        for start in range(0, len(order), group):
            chunk = order[start : start + group]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk) - self.batch_size + 1,
                                                                         self.batch_size))
        batches = [batches[i] for i in rng.permutation(len(batches))]
        per_rank = len(batches) // self.world_size
        return batches[self.rank :: self.world_size][:per_rank]

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(self.epoch))  # the same count every epoch

    def batch_at(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        chosen = self.epoch_batches(epoch)[index]
        batch = pad_batch([self.examples[int(i)] for i in chosen], self.pad_id)
        batch["index"] = torch.as_tensor(chosen, dtype=torch.long)
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.shuffle:
            yield from super().__iter__()
            return
        for index in range(len(self.epoch_batches(0))):  # one ordered pass for evaluation
            yield self.batch_at(0, index)

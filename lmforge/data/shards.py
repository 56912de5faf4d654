"""Token shards: a corpus tokenized once into memory-mapped arrays.

Layout of a shard folder::

    index.json                 dtype, vocab size, shards, token/document counts, fingerprint
    shard-00000.bin            token ids, uint16 (vocab < 65,536) or uint32, documents back to back
    shard-00000.docs.npy       int64 document start offsets into the shard (+ the end), no pickle

Each document is followed by the separator token (EOS, or [SEP] for BERT vocabularies),
so packing into fixed-length blocks later never needs the document list.

Tokenizing runs in worker processes on chunks of documents, with a bounded number of
chunks in flight, so memory stays flat whatever the corpus size. A fingerprint of the
tokenizer, the options and the document stream's content lets a re-run with the same
inputs reuse the shards instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from lmforge.errors import DataError
from lmforge.fileio import write_json
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)
FORMAT_VERSION = 1

# -------------------------------------------------------------------- worker side

_worker_tokenizer = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    from tokenizers import Tokenizer as RustTokenizer

    _worker_tokenizer = RustTokenizer.from_str(tokenizer_json)


def _encode_chunk(
    documents: list[str] | list[list[str]], dtype: str, separator: int | None, bos: int | None, word_starts: bool
) -> tuple[bytes, bytes, bytes]:
    """Token ids of a chunk (documents back to back, each closed by the separator), the
    document lengths, and (when asked) a 0/1 byte per token marking the first token of
    each word — all as raw bytes (cheap to send between processes, nothing pickled).

    Documents given as lists of words keep that segmentation (e.g. segmented Chinese).
    """
    assert _worker_tokenizer is not None
    pretokenized = bool(documents) and not isinstance(documents[0], str)
    encodings = _worker_tokenizer.encode_batch(documents, is_pretokenized=pretokenized, add_special_tokens=False)
    extra = (separator is not None) + (bos is not None)
    lengths = np.fromiter((len(e.ids) + extra for e in encodings), dtype=np.int64, count=len(encodings))
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    starts = np.ones(len(tokens), dtype=np.uint8) if word_starts else np.empty(0, dtype=np.uint8)
    position = 0
    for encoding in encodings:
        if bos is not None:
            tokens[position] = bos
            position += 1
        ids = encoding.ids
        tokens[position : position + len(ids)] = ids
        if word_starts and ids:
            words = np.array([-1 if w is None else w for w in encoding.word_ids], dtype=np.int64)
            starts[position + 1 : position + len(ids)] = words[1:] != words[:-1]
        position += len(ids)
        if separator is not None:
            tokens[position] = separator
            position += 1
    return tokens.tobytes(), lengths.tobytes(), starts.tobytes()


# -------------------------------------------------------------------- main side


@dataclass
class ShardInfo:
    path: Path
    tokens: int
    documents: int


Document = str | list[str]  # text, or a list of words (already segmented)


def _document_bytes(document: Document) -> bytes:
    if isinstance(document, str):
        return document.encode("utf-8")
    if isinstance(document, list) and all(isinstance(w, str) for w in document):
        return "".join(document).encode("utf-8")
    raise DataError(f"documents must be strings or lists of words, found {type(document).__name__}")


def _chunks(documents: Iterable[Document], chunk_bytes: int) -> Iterator[tuple[list[Document], int]]:
    """Documents grouped into chunks of about ``chunk_bytes`` UTF-8 bytes (with the size);
    a chunk never mixes texts and word lists."""
    chunk: list[Document] = []
    size = 0
    for document in documents:
        data = _document_bytes(document)
        if chunk and isinstance(document, str) != isinstance(chunk[0], str):
            yield chunk, size
            chunk, size = [], 0
        chunk.append(document)
        size += len(data)
        if size >= chunk_bytes:
            yield chunk, size
            chunk, size = [], 0
    if chunk:
        yield chunk, size


def fingerprint(documents: Iterable[Document], tokenizer: Tokenizer, options: dict[str, object]) -> tuple[str, int, int]:
    """Content hash of (tokenizer, options, documents); also returns bytes and document count."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(tokenizer.backend.to_str().encode("utf-8"))
    digest.update(json.dumps(options, sort_keys=True).encode("utf-8"))
    total = count = 0
    for document in documents:
        data = _document_bytes(document)
        if not isinstance(document, str):  # word boundaries are part of the content
            data = "\u2063".join(document).encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
        total += len(data)
        count += 1
    return digest.hexdigest(), total, count


def separator_id(tokenizer: Tokenizer) -> int | None:
    """The token that closes each document: EOS for decoders, [SEP] for BERT vocabularies."""
    for key in ("eos_token", "sep_token"):
        token_id = tokenizer.token_id(tokenizer.special_tokens.get(key))
        if token_id is not None:
            return token_id
    return None


def prepare_shards(
    documents: Callable[[], Iterable[Document]],
    tokenizer: Tokenizer,
    output: str | Path,
    workers: int | None = None,
    shard_tokens: int = 50_000_000,
    chunk_bytes: int = 1 << 20,
    add_bos: bool | None = None,
    word_starts: bool = False,
    progress: bool = True,
) -> Path:
    """Tokenize ``documents()`` into shards under ``output``; reuse them if the inputs match.

    documents: a function returning a fresh iterable (it is read twice: once to hash the
    content, once to tokenize, so nothing has to be held in memory).
    add_bos: put BOS before each document (default: the tokenizer's own ``add_bos``).
    word_starts: also store which tokens start a word (for whole-word masking); word
    lists as documents define the words, otherwise the tokenizer's pre-tokenizer does.
    """
    output = Path(output)
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    vocab_size = tokenizer.vocab_size
    dtype = "uint16" if vocab_size <= 65_536 else "uint32"
    separator = separator_id(tokenizer)
    bos = tokenizer.bos_id if (tokenizer.add_bos if add_bos is None else add_bos) else None
    options = {"version": FORMAT_VERSION, "dtype": dtype, "separator": separator, "bos": bos,
               "shard_tokens": shard_tokens, "word_starts": word_starts}
    print_fn = tqdm.write if progress else (lambda *_: None)
    key, total_bytes, document_count = fingerprint(documents(), tokenizer, options)
    if document_count == 0:
        raise DataError("the corpus is empty: no documents to tokenize")
    if _fingerprint_of(output) == key:
        print_fn(f"shards in {output} match these inputs ({key}); reusing them")
        return output
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start_time = time.perf_counter()
    shards = _tokenize_into(tmp, documents, tokenizer, options, workers, chunk_bytes, total_bytes, progress)
    elapsed = time.perf_counter() - start_time
    index = {
        "format_version": FORMAT_VERSION,
        "fingerprint": key,
        "dtype": dtype,
        "vocab_size": vocab_size,
        "separator_id": separator,
        "bos_id": bos,
        "word_starts": word_starts,
        "documents": sum(s.documents for s in shards),
        "tokens": sum(s.tokens for s in shards),
        "bytes": total_bytes,
        "seconds": round(elapsed, 3),
        "shards": [{"file": s.path.name, "tokens": s.tokens, "documents": s.documents} for s in shards],
    }
    write_json(tmp / "index.json", index)
    if output.exists():  # the new shards replace the old ones whole
        shutil.rmtree(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, output)
    print_fn(f"{index['documents']:,} documents, {index['tokens']:,} tokens, "
             f"{total_bytes / 2**20:.1f} MiB in {elapsed:.1f}s ({total_bytes / 2**20 / max(elapsed, 1e-9):.2f} MiB/s)")
    return output


def _fingerprint_of(folder: Path) -> str | None:
    """The input fingerprint recorded by the shards in ``folder`` (None: none readable there)."""
    try:
        return json.loads((folder / "index.json").read_text()).get("fingerprint")
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        return None


def _tokenize_into(folder: Path, documents: Callable[[], Iterable[Document]], tokenizer: Tokenizer,
                   options: dict[str, Any], workers: int, chunk_bytes: int, total_bytes: int, progress: bool
                   ) -> list[ShardInfo]:
    """Encode the documents in chunks on ``workers`` processes (at most 2 chunks per worker in
    flight, so memory stays bounded) and write them to shards in ``folder``, in order. On
    any failure, ``folder`` is removed."""
    writer = _ShardWriter(folder, options["shard_tokens"], options["word_starts"])
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing",
               disable=not progress, smoothing=0.1)
    encode = (options["dtype"], options["separator"], options["bos"], options["word_starts"])
    in_flight: deque[Future[tuple[bytes, bytes]]] = deque()
    try:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(tokenizer.backend.to_str(),)) as pool:
            for chunk, chunk_size in _chunks(documents(), chunk_bytes):
                in_flight.append(pool.submit(_encode_chunk, chunk, *encode))
                in_flight[-1].add_done_callback(lambda _f, n=chunk_size: bar.update(n))
                while len(in_flight) >= 2 * workers:  # bounded memory: wait for the oldest
                    writer.write(*in_flight.popleft().result())
            while in_flight:
                writer.write(*in_flight.popleft().result())
        writer.close_shard()
    except BaseException:
        writer.abort()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        bar.close()
    return writer.shards


class _ShardWriter:
    """Appends encoded chunks to shard files of about ``shard_tokens`` tokens each, with
    their document boundaries (``.docs.npy``) and, optionally, word starts."""

    def __init__(self, folder: Path, shard_tokens: int, word_starts: bool) -> None:
        self.folder, self.shard_tokens, self.word_starts = folder, shard_tokens, word_starts
        self.shards: list[ShardInfo] = []
        self.handle: IO[bytes] | None = None
        self.words: IO[bytes] | None = None
        self.tokens = 0
        self.starts = [0]

    def write(self, tokens: bytes, lengths: bytes, starts: bytes) -> None:
        """One encoded chunk: token ids (the shard dtype), int64 document lengths, word starts."""
        if self.handle is None or self.tokens >= self.shard_tokens:
            self.close_shard()
            self._open_shard()
        assert self.handle is not None
        self.handle.write(tokens)
        if self.words is not None:
            self.words.write(starts)
        ends = self.tokens + np.cumsum(np.frombuffer(lengths, dtype=np.int64))
        self.starts.extend(ends.tolist())
        self.tokens = int(ends[-1]) if len(ends) else self.tokens

    def _open_shard(self) -> None:
        path = self.folder / f"shard-{len(self.shards):05d}.bin"
        self.handle = open(path, "wb")  # noqa: SIM115 - closed in close_shard
        if self.word_starts:
            self.words = open(path.with_suffix(".words.bin"), "wb")  # noqa: SIM115
        self.tokens, self.starts = 0, [0]
        self.shards.append(ShardInfo(path, 0, 0))

    def close_shard(self) -> None:
        if self.handle is None:
            return
        self.handle.close()
        if self.words is not None:
            self.words.close()
            self.words = None
        info = self.shards[-1]
        starts = np.asarray(self.starts, dtype=np.int64)
        np.save(info.path.with_suffix(".docs.npy"), starts, allow_pickle=False)
        info.tokens, info.documents = int(starts[-1]), len(starts) - 1
        self.handle = None

    def abort(self) -> None:
        for handle in (self.handle, self.words):
            if handle is not None:
                handle.close()


class TokenShards:
    """Read-only view of a shard folder: one token stream, with document boundaries."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.exists():
            raise DataError(f"{self.folder}: not a shard folder (no index.json); run `lmforge prepare`")
        self.index = json.loads(index_path.read_text())
        self.dtype = np.dtype(self.index["dtype"])
        self.arrays = [np.memmap(self.folder / s["file"], dtype=self.dtype, mode="r") if s["tokens"] else
                       np.zeros(0, dtype=self.dtype) for s in self.index["shards"]]
        starts = [np.load((self.folder / s["file"]).with_suffix(".docs.npy"), allow_pickle=False)
                  for s in self.index["shards"]]
        offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.shard_offsets = offsets  # global start of each shard
        # global document start positions (+ final end)
        self.document_starts = np.concatenate([s[:-1] + o for s, o in zip(starts, offsets[:-1], strict=True)]
                                              + [offsets[-1:]])
        self.separator_id = self.index["separator_id"]
        self.word_start_arrays = None
        if self.index.get("word_starts"):
            self.word_start_arrays = [np.memmap((self.folder / s["file"]).with_suffix(".words.bin"), dtype=np.uint8,
                                                mode="r") if s["tokens"] else np.zeros(0, dtype=np.uint8)
                                      for s in self.index["shards"]]

    def __len__(self) -> int:
        """Total tokens."""
        return int(self.shard_offsets[-1])

    @property
    def num_documents(self) -> int:
        return len(self.document_starts) - 1

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the global stream (crossing shard boundaries if needed)."""
        return self._slice(self.arrays, start, end)

    def word_starts(self, start: int, end: int) -> np.ndarray:
        """1 where token i of [start, end) starts a word (shards prepared with word_starts)."""
        if self.word_start_arrays is None:
            raise DataError(f"{self.folder}: shards were prepared without word boundaries (word_starts=True)")
        return self._slice(self.word_start_arrays, start, end)

    def _slice(self, arrays: list[np.ndarray], start: int, end: int) -> np.ndarray:
        if start < 0 or end > len(self) or start > end:
            raise IndexError(f"token range [{start}, {end}) outside [0, {len(self)})")
        pieces = []
        shard = int(np.searchsorted(self.shard_offsets, start, side="right") - 1)
        while start < end:
            local = start - self.shard_offsets[shard]
            take = min(end - start, len(arrays[shard]) - local)
            pieces.append(np.asarray(arrays[shard][local : local + take]))
            start += take
            shard += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def document(self, index: int) -> np.ndarray:
        """Tokens of one document (with its separator)."""
        return self.tokens(int(self.document_starts[index]), int(self.document_starts[index + 1]))

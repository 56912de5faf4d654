"""Tokenizers: a thin layer over Hugging Face ``tokenizers`` (Rust) with the facts a
model needs beside the vocabulary: special tokens, whether to add BOS, a chat template.

Saved as ``tokenizer.json`` (the Rust tokenizer) plus ``tokenizer_config.json`` (our
metadata, in the keys transformers also reads), so a checkpoint folder opens in both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.errors import TokenizerError
from lmforge.fileio import write_json

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")


BERT_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BPE_SPECIAL = ("<|endoftext|>", "<|pad|>")


@dataclass
class Encoded:
    """One encoded text (or pair), with what span and word-level tasks need.

    offsets: (start, end) character positions in the original text (of the first or the
    second sequence, as ``sequence_ids`` says); (0, 0) for added special tokens.
    word_ids: index of the word each token belongs to; None for special tokens.
    """

    ids: list[int]
    token_type_ids: list[int]
    offsets: list[tuple[int, int]]
    word_ids: list[int | None]
    sequence_ids: list[int | None]
    special_tokens_mask: list[int]


class Tokenizer:
    """A Rust tokenizer plus special tokens and an optional chat template."""

    def __init__(
        self,
        backend: RustTokenizer,
        special_tokens: dict[str, str | None] | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        # Batching code pads and truncates explicitly; a tokenizer.json that pads to a fixed
        # length on its own (some checkpoints ship one) would silently change every encoding.
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.add_bos = add_bos
        self.chat_template = chat_template

    # -- ids of special tokens
    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def special_ids(self) -> list[int]:
        """Ids of the named special tokens ([CLS], [SEP], [PAD], [MASK], bos/eos ...)."""
        return [i for i in (self.token_id(t) for t in self.special_tokens.values()) if i is not None]

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("bos_token"))

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("eos_token"))

    @property
    def pad_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("pad_token"))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # -- encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [
            e.ids if not (add_special_tokens and self.add_bos and self.bos_id is not None)
            else [self.bos_id, *e.ids]
            for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        ]

    def encode_full(
        self,
        text: str | Sequence[str],
        pair: str | Sequence[str] | None = None,
        add_special_tokens: bool = True,
    ) -> Encoded:
        """Encode with offsets, word ids and token types. Pass lists of words (already
        segmented, e.g. Chinese) to make ``word_ids`` follow that segmentation."""
        pretokenized = not isinstance(text, str)
        encoding = self.backend.encode(text, pair, is_pretokenized=pretokenized, add_special_tokens=add_special_tokens)
        ids, types = list(encoding.ids), list(encoding.type_ids)
        offsets, words = [tuple(o) for o in encoding.offsets], list(encoding.word_ids)
        sequences, special = list(encoding.sequence_ids), list(encoding.special_tokens_mask)
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids, types, offsets = [self.bos_id, *ids], [0, *types], [(0, 0), *offsets]
            words, sequences, special = [None, *words], [None, *sequences], [1, *special]
        return Encoded(ids, types, offsets, words, sequences, special)  # type: ignore[arg-type]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}]) with the chat template."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template; drop --chat or use a chat model")
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise TokenizerError(f"chat template: {message}")

        environment.globals["raise_exception"] = raise_exception
        template = environment.from_string(self.chat_template)
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in self.special_tokens.items()},
        )

    # -- persistence
    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into ``folder``."""
        folder = Path(folder)
        self.backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = dict(self.special_tokens)
        config["add_bos_token"] = self.add_bos
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        if self.chat_template:
            config["chat_template"] = self.chat_template
        write_json(folder / "tokenizer_config.json", config)

    save_hf = save  # the same two files are what transformers reads

    @classmethod
    def load(cls, folder: str | Path) -> Tokenizer:
        """Load from tokenizer.json (+ tokenizer_config.json), or a BERT vocab.txt."""
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.exists():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise TokenizerError(f"{config_path}: not valid JSON ({error})") from error
        special_map = folder / "special_tokens_map.json"
        if special_map.exists():
            for key, value in json.loads(special_map.read_text(encoding="utf-8")).items():
                config.setdefault(key, value)
        special = {k: _token_text(config.get(k)) for k in SPECIAL_KEYS}
        if (folder / "tokenizer.json").exists():
            try:
                backend = RustTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as error:
                raise TokenizerError(f"{folder / 'tokenizer.json'}: cannot load ({error})") from error
        elif (folder / "vocab.txt").exists():
            backend = wordpiece_from_vocab(folder / "vocab.txt", lowercase=config.get("do_lower_case", True))
            for key, default in (("unk_token", "[UNK]"), ("pad_token", "[PAD]"), ("cls_token", "[CLS]"),
                                 ("sep_token", "[SEP]"), ("mask_token", "[MASK]")):
                special[key] = special.get(key) or default
        else:
            raise TokenizerError(f"{folder}: no tokenizer.json or vocab.txt")
        return cls(backend, special, bool(config.get("add_bos_token", False)), config.get("chat_template"))


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # transformers' AddedToken form
        return value.get("content")
    return value


def wordpiece_from_vocab(path: Path, lowercase: bool = True) -> RustTokenizer:
    """A BERT WordPiece tokenizer from a vocab.txt (one token per line)."""
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            token = line.rstrip("\n")
            if token in vocab:
                raise TokenizerError(f"{path}:{index + 1}: duplicate token {token!r}")
            vocab[token] = index
    for needed in ("[UNK]", "[CLS]", "[SEP]"):
        if needed not in vocab:
            raise TokenizerError(f"{path}: vocabulary has no {needed} token")
    backend = RustTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase, handle_chinese_chars=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def _batches(documents: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for document in documents:
        batch.append(document)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_wordpiece(
    documents: Iterable[str],
    vocab_size: int = 30522,
    lowercase: bool = True,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a BERT-style WordPiece tokenizer: BERT normalisation (optional lowercasing,
    accents stripped with it), every CJK character its own word, [CLS] A [SEP] B [SEP]."""
    def bert_backend(model: models.Model) -> RustTokenizer:
        backend = RustTokenizer(model)
        backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase, handle_chinese_chars=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        return backend

    backend = bert_backend(models.WordPiece(unk_token="[UNK]"))
    documents = list(documents)
    # The trainer gives a "##x" token its id in the order it meets x inside a word while
    # walking a hash map, which changes from process to process; ties between equally
    # frequent merges are broken by those ids, so the same text gave different vocabularies.
    # Declared up front (sorted, beside the specials) they get the same ids in every run,
    # and the merges, the vocabulary and every id after them are the same too.
    inner: set[str] = set()
    for document in documents:
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(document)):
            inner.update(word[1:])
    declared = list(BERT_SPECIAL) + ["##" + c for c in sorted(inner)]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=declared, show_progress=show_progress)
    backend.train_from_iterator(_batches(documents), trainer)
    # Specials keep their ids and every other token is numbered in sorted order; the
    # declared "##x" tokens become ordinary vocabulary (a fresh backend: not added tokens).
    vocab = backend.get_vocab()
    specials = sorted((i, t) for t, i in vocab.items() if t in BERT_SPECIAL)
    ordered = [t for _, t in specials] + sorted(t for t in vocab if t not in BERT_SPECIAL)
    backend = bert_backend(models.WordPiece({t: i for i, t in enumerate(ordered)}, unk_token="[UNK]"))
    backend.add_special_tokens(list(BERT_SPECIAL))
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    special = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
               "mask_token": "[MASK]"}
    return Tokenizer(backend, special)


def train_bpe(
    documents: Iterable[str],
    vocab_size: int = 32000,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a GPT-style byte-level BPE tokenizer (no unknown tokens: every byte is in the
    vocabulary). ``<|endoftext|>`` is both BOS and EOS, as in GPT-2; ``<|pad|>`` pads."""
    backend = RustTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(BPE_SPECIAL), show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_batches(documents), trainer)
    special = {"bos_token": BPE_SPECIAL[0], "eos_token": BPE_SPECIAL[0], "pad_token": BPE_SPECIAL[1]}
    return Tokenizer(backend, special, add_bos=False)

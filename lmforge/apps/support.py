"""A customer-service assistant over a FAQ: retrieval fine-tuned with lmforge, multi-turn,
grounded answers, handoff to a person.

    build_kb(faq, output)            FAQ file -> knowledge-base folder (KB)
    KnowledgeBase.load(KB).ask(q)    the answer, its score, the FAQ entry, the category, handoff
    Assistant(kb).chat(session, q)   the same with the session's history (follow-ups) and a log
    evaluate_kb(kb, entries)         hit@1/5/10, MRR@10, category accuracy, latency p50/p99

The KB folder::

    KB/kb.json           settings chosen at build (fusion weight, handoff threshold), the FAQ's
                         provenance (path, sha256, fields), the split, validation metrics
    KB/entries.jsonl     one FAQ entry per line (id, question, answer, category, split, source)
    KB/encoder/          the fine-tuned bi-encoder (an ordinary lmforge model folder)
    KB/index/            vectors.faiss + vectors.npy (answers), bm25/ (answers' words)
    KB/category/         a logistic-regression head on question embeddings (when categories exist)
    KB/manifest.json     sha256 of every file above: a changed file is refused at load

Build: the FAQ's questions are split by a hash of their text into train / validation /
test (20% test, 10% validation by default; every *answer* stays in the index, so a test
question asks for an answer whose question the encoder never saw). The encoder is trained
on the train questions against their answers with in-batch negatives; the fusion weight of
dense and BM25 scores and the handoff threshold are chosen on the validation questions;
``evaluate_kb`` scores the test questions.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.apps.folder import load_encoder_and_vectors, open_folder, read_jsonl
from lmforge.data.corpora import package_dir, split_of
from lmforge.data.sources import read_examples
from lmforge.errors import ConfigError, DataError
from lmforge.eval.metrics import retrieval_metrics
from lmforge.fileio import atomic_directory, folder_manifest, read_json, sha256_file, write_json
from lmforge.retrieval.encoder import Pair, SentenceEncoder, packaged_minilm, train_bi_encoder
from lmforge.retrieval.index import LexicalIndex, VectorIndex, hybrid, words

log = logging.getLogger("lmforge.apps.support")
KB_VERSION = 1
ALPHAS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)  # dense weight grid searched on validation
CANDIDATES = 50  # each side's top-k whose union the hybrid ranks
# FAQs that install with a package (read where installed; never copied into a KB's repo)
PACKAGED_FAQS = {
    "construction_faq": ("zaragoza_construction_faq", "data/faq-en.csv", "q", "a", "category", "id",
                         "pip install zaragoza-construction-faq", "CC-BY-4.0, Zaragoza AB"),
    "construction_faq_sv": ("zaragoza_construction_faq", "data/faq.csv", "q", "a", "category", "id",
                            "pip install zaragoza-construction-faq", "CC-BY-4.0, Zaragoza AB"),
}
# words that point back to an earlier turn: a question holding one is read with the last one
FOLLOW_UP_WEIGHT = 0.7  # the topic's share of a follow-up's query vector
REFERRING = frozenset("that it this those these they them there its their such same one".split())


# ----------------------------------------------------------------------------- the FAQ
@dataclass
class FaqEntry:
    id: str
    question: str
    answer: str
    category: str | None
    source: str  # file:line
    split: str = "train"


def normalise_question(text: str) -> str:
    return " ".join(text.casefold().split())


def resolve_faq(faq: str, question_field: str | None, answer_field: str | None, category_field: str | None,
                id_field: str | None) -> tuple[Path, str, str, str | None, str | None, str]:
    """(path, fields, provenance) of a FAQ file or a packaged FAQ (``corpus:NAME``)."""
    if faq.startswith("corpus:"):
        name = faq.removeprefix("corpus:")
        if name not in PACKAGED_FAQS:
            raise DataError(f"{faq}: unknown packaged FAQ (known: {', '.join('corpus:' + n for n in PACKAGED_FAQS)})")
        module, relative, q, a, c, i, install, licence = PACKAGED_FAQS[name]
        path = package_dir(module, install) / relative
        return (path, question_field or q, answer_field or a, category_field or c, id_field or i,
                f"{module} ({licence})")
    return Path(faq), question_field or "question", answer_field or "answer", category_field, id_field, "user file"


def read_faq(path: str | Path, question_field: str = "question", answer_field: str = "answer",
             category_field: str | None = "category", id_field: str | None = None,
             duplicates: str = "error") -> list[FaqEntry]:
    """FAQ entries from CSV, JSONL or Parquet. Errors name file:line: a missing or empty
    question or answer, a missing category (when a category field is named), the same
    question twice with different answers (``duplicates="merge"`` joins such answers into
    one entry instead). Exact repeats are dropped with a warning."""
    if duplicates not in ("error", "merge"):
        raise ConfigError([f"duplicates={duplicates!r}: must be 'error' or 'merge'"])
    fields = {"question": question_field, "answer": answer_field}
    if category_field:
        fields["category"] = category_field
    if id_field:
        fields["id"] = id_field
    entries: list[FaqEntry] = []
    seen: dict[str, FaqEntry] = {}
    repeats = merged = 0
    for number, record in enumerate(read_examples(path, fields)):
        question, answer = str(record["question"]).strip(), str(record["answer"]).strip()
        key = normalise_question(question)
        if key in seen:
            earlier = seen[key]
            if " ".join(answer.split()) not in " ".join(earlier.answer.split()):
                if duplicates == "error":
                    raise DataError(f"{record['_source']}: the question {question!r} is also at {earlier.source} with "
                                    "a different answer; keep one answer per question (merge them, reword one "
                                    "question, or pass --duplicates merge to join the answers)")
                earlier.answer = f"{earlier.answer}\n\n{answer}"
                earlier.source = f"{earlier.source}+{record['_source'].rsplit(':', 1)[-1]}"
                merged += 1
                continue
            repeats += 1
            continue
        category = str(record["category"]).strip() if category_field else None
        entry = FaqEntry(str(record.get("id") or f"faq-{number + 1}"), question, answer, category, record["_source"])
        seen[key] = entry
        entries.append(entry)
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise DataError(f"{path}: ids used more than once: {', '.join(twice[:5])}")
    if merged:
        log.warning("%s: %d questions asked twice with different answers: their answers were joined", path, merged)
    if repeats:
        log.warning("%s: %d exact repeats of a question and its answer were dropped", path, repeats)
    return entries


# ----------------------------------------------------------------------------- building
@dataclass
class BuildConfig:
    """How ``build_kb`` trains and tunes. ``epochs`` 0 keeps the encoder untuned."""

    epochs: float = 5.0
    batch_size: int = 32
    lr: float = 2e-5
    test_share: float = 0.2
    validation_share: float = 0.1
    seed: int = 0
    max_tokens: int = 256

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 0:
            problems.append(f"epochs={self.epochs}: must be >= 0")
        if not (0 <= self.test_share < 1 and 0 <= self.validation_share < 1
                and self.test_share + self.validation_share < 1):
            problems.append(f"test_share={self.test_share}, validation_share={self.validation_share}: each in [0, 1), "
                            "together below 1")
        if self.batch_size < 2:
            problems.append(f"batch_size={self.batch_size}: in-batch negatives need >= 2")
        if problems:
            raise ConfigError(problems, where="support build")


def build_kb(faq: str, output: str | Path, model: str | Path | None = None, question_field: str | None = None,
             answer_field: str | None = None, category_field: str | None = None, id_field: str | None = None,
             duplicates: str = "error", config: BuildConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Read, split, train, index and tune; write the KB folder atomically. Returns kb.json."""
    from lmforge.checkpoint import load_pretrained, save_model

    config = config or BuildConfig()
    path, q_field, a_field, c_field, id_field, provenance = resolve_faq(faq, question_field, answer_field,
                                                                        category_field, id_field)
    if not path.exists():
        raise DataError(f"{path}: no such FAQ file")
    entries = read_faq(path, q_field, a_field, c_field, id_field, duplicates)
    if len(entries) < 2:
        raise DataError(f"{path}: {len(entries)} FAQ entries; a knowledge base needs at least 2")
    for entry in entries:
        entry.split = split_of(normalise_question(entry.question), config.validation_share, config.test_share)
    source = Path(model) if model else packaged_minilm()
    encoder_model, tokenizer = load_pretrained(source)
    if tokenizer is None:
        raise DataError(f"{source}: the encoder folder has no tokenizer")
    encoder = SentenceEncoder(encoder_model, tokenizer, config.max_tokens)
    started = time.perf_counter()
    train = [e for e in entries if e.split == "train"]
    training: dict[str, Any] = {"pairs": len(train), "epochs": config.epochs}
    with tempfile.TemporaryDirectory(prefix="lmforge-support-") as scratch:
        if config.epochs > 0 and len(train) >= 2:
            pairs = [Pair(e.question, e.answer, e.answer) for e in train]
            summary = train_bi_encoder(encoder, pairs, Path(scratch) / "run", epochs=config.epochs,
                                       batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                                       progress=progress)
            training.update(steps=int(summary["steps"]), batch_size=int(summary["batch_size"]), lr=config.lr,
                            loss=_last_loss(Path(scratch) / "run"))
    training["seconds"] = round(time.perf_counter() - started, 1)
    vectors = VectorIndex.build(encoder.embed([e.answer for e in entries]))
    lexical = LexicalIndex.build([e.answer for e in entries])
    kb = KnowledgeBase(entries, encoder, vectors, lexical, alpha=0.9, threshold=0.0, settings={})
    validation = [e for e in entries if e.split == "validation"]
    kb.alpha, alpha_scores = _choose_alpha(kb, validation)
    kb.threshold, threshold_info = _choose_threshold(kb, validation)
    category = _train_category(kb, train) if c_field else None
    kb.category = category
    settings = {
        "version": KB_VERSION, "alpha": kb.alpha, "threshold": kb.threshold, "max_tokens": encoder.max_tokens,
        "faq": {"path": str(path.resolve()), "sha256": sha256_file(path), "entries": len(entries), "provenance": provenance,
                "fields": {"question": q_field, "answer": a_field, "category": c_field, "id": id_field},
                "duplicates": duplicates},
        "encoder": {"source": str(source), "trained": training},
        "split": {"test_share": config.test_share, "validation_share": config.validation_share,
                  "counts": {s: sum(e.split == s for e in entries) for s in ("train", "validation", "test")}},
        "validation": {"alpha_mrr": alpha_scores, **threshold_info},
        "categories": category.labels if category else None,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    kb.settings = settings
    output = Path(output)
    with atomic_directory(output) as folder:
        save_model(encoder.model, folder / "encoder", tokenizer)
        (folder / "index").mkdir()
        vectors.save(folder / "index")
        lexical.save(folder / "index")
        if category:
            category.save(folder / "category")
        with open(folder / "entries.jsonl", "w", encoding="utf-8") as handle:
            for entry in entries:
                handle.write(json.dumps(asdict(entry), ensure_ascii=False) + "\n")
        write_json(folder / "kb.json", settings)
        write_json(folder / "manifest.json", folder_manifest(folder))
    return settings


def _last_loss(run: Path) -> float | None:
    losses = []
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record and record.get("split", "train") == "train":
                losses.append(record["loss"])
    return round(float(losses[-1]), 4) if losses else None


def _choose_alpha(kb: KnowledgeBase, validation: Sequence[FaqEntry]) -> tuple[float, dict[str, float]]:
    """The dense weight with the best validation MRR@10 (0.9 without validation questions)."""
    if not validation:
        return 0.9, {}
    gold = [kb.position[e.id] for e in validation]
    queries = [kb.query_vector(e.question) for e in validation]
    scores = {}
    for alpha in ALPHAS:
        ranked = [kb.rank(e.question, v, alpha, 10)[0] for e, v in zip(validation, queries, strict=True)]
        scores[str(alpha)] = round(retrieval_metrics(ranked, gold)["mrr@10"], 4)
    best = max(ALPHAS, key=lambda a: (scores[str(a)], a))  # ties: the more semantic side
    return best, scores


def _choose_threshold(kb: KnowledgeBase, validation: Sequence[FaqEntry]) -> tuple[float, dict[str, Any]]:
    """The handoff threshold on the top fused score that makes the most right decisions on
    validation questions: answer when the top entry is right, hand off when it is wrong."""
    if not validation:
        return 0.0, {"threshold_note": "no validation questions: nothing is handed off by score"}
    tops, right = [], []
    for entry in validation:
        ids, scores = kb.rank(entry.question, kb.query_vector(entry.question), kb.alpha, 1)
        tops.append(float(scores[0]))
        right.append(int(ids[0]) == kb.position[entry.id])
    # every threshold between two neighbouring observed scores decides the same way: take the
    # best gap, and its middle (the largest margin to the validation scores on either side)
    points = sorted({0.0, *tops})
    best, best_correct = 0.0, -1
    for low, high in zip(points, [*points[1:], points[-1] + 0.1], strict=True):
        threshold = (low + high) / 2
        correct = sum((score >= threshold) == ok for score, ok in zip(tops, right, strict=True))
        if correct > best_correct:
            best, best_correct = threshold, correct
    return round(best, 4), {"decisions_right": round(best_correct / len(validation), 4),
                            "top1_right": round(sum(right) / len(right), 4)}


@dataclass
class CategoryHead:
    """Multinomial logistic regression on question embeddings (weights as .npy, no pickles)."""

    labels: list[str]
    weight: np.ndarray  # (C, H)
    bias: np.ndarray  # (C,)

    def probabilities(self, vector: np.ndarray) -> np.ndarray:
        logits = self.weight @ vector + self.bias
        logits = logits - logits.max()
        exp = np.exp(logits)
        return exp / exp.sum()  # type: ignore[no-any-return]

    def save(self, folder: Path) -> None:
        folder.mkdir()
        np.save(folder / "weight.npy", self.weight, allow_pickle=False)
        np.save(folder / "bias.npy", self.bias, allow_pickle=False)
        write_json(folder / "labels.json", self.labels)

    @classmethod
    def load(cls, folder: Path) -> CategoryHead:
        return cls(read_json(folder / "labels.json"), np.load(folder / "weight.npy", allow_pickle=False),
                   np.load(folder / "bias.npy", allow_pickle=False))


def _train_category(kb: KnowledgeBase, train: Sequence[FaqEntry]) -> CategoryHead | None:
    """Trained on the train questions and on every answer (answers are in the KB whatever
    the split; with both, accuracy on held-out questions rose from 0.65 to 0.81 on the
    construction FAQ); weak regularisation (C=100) suits these few, clean examples."""
    from sklearn.linear_model import LogisticRegression

    questions = [e for e in train if e.category]
    answers = [(i, e) for i, e in enumerate(kb.entries) if e.category]
    labels = sorted({e.category for e in questions + [e for _, e in answers] if e.category})
    if len(labels) < 2:
        return None
    x = np.vstack([kb.encoder.embed([e.question for e in questions]).reshape(-1, kb.encoder.dim),
                   kb.vectors.vectors[[i for i, _ in answers]]])
    y = [labels.index(e.category) for e in questions] + [labels.index(e.category) for _, e in answers]  # type: ignore[arg-type]
    classifier = LogisticRegression(C=100.0, max_iter=3000).fit(x, y)
    weight = np.zeros((len(labels), x.shape[1]), dtype=np.float32)
    bias = np.full(len(labels), -1e4, dtype=np.float32)  # a label no train question has is never predicted
    for row, label in enumerate(classifier.classes_):
        weight[label] = classifier.coef_[row] if len(classifier.classes_) > 2 else \
            (classifier.coef_[0] if row == 1 else -classifier.coef_[0]) / 2
        bias[label] = classifier.intercept_[row] if len(classifier.classes_) > 2 else \
            (classifier.intercept_[0] if row == 1 else -classifier.intercept_[0]) / 2
    return CategoryHead(labels, weight, bias)


# ----------------------------------------------------------------------------- asking
class KnowledgeBase:
    """A loaded KB: ``ask`` retrieves the best FAQ entry for a question."""

    def __init__(self, entries: list[FaqEntry], encoder: SentenceEncoder, vectors: VectorIndex,
                 lexical: LexicalIndex, alpha: float, threshold: float, settings: dict[str, Any],
                 category: CategoryHead | None = None) -> None:
        self.entries, self.encoder, self.vectors, self.lexical = entries, encoder, vectors, lexical
        self.alpha, self.threshold, self.settings, self.category = alpha, threshold, settings, category
        self.position = {e.id: i for i, e in enumerate(entries)}
        self.lock = threading.Lock()  # one torch forward at a time (a server calls from threads)

    @classmethod
    def load(cls, folder: str | Path) -> KnowledgeBase:
        """A KB folder, checked: every file against manifest.json, and the stored answer
        vectors against the encoder (a KB whose encoder was swapped is refused)."""
        folder = Path(folder)
        settings = open_folder(folder, "kb.json", KB_VERSION, "knowledge base", "lmforge app support build")
        entries = [FaqEntry(**record) for record in read_jsonl(folder / "entries.jsonl")]
        encoder, vectors = load_encoder_and_vectors(folder, settings["max_tokens"], len(entries), entries[0].answer,
                                                    "entries")
        lexical = LexicalIndex.load(folder / "index", len(entries))
        category = CategoryHead.load(folder / "category") if (folder / "category").exists() else None
        return cls(entries, encoder, vectors, lexical, settings["alpha"], settings["threshold"], settings, category)

    def query_vector(self, text: str) -> np.ndarray:
        with self.lock:
            return self.encoder.embed([text])[0]

    def rank(self, text: str, vector: np.ndarray, alpha: float, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(entry positions, fused scores) of the ``k`` best entries."""
        dense_ids, _ = self.vectors.search(vector, CANDIDATES)
        if alpha >= 1.0:
            return dense_ids[:k], self.vectors.scores_for(vector, dense_ids[:k])
        lexical_ids, _ = self.lexical.search(text, CANDIDATES)
        candidates = np.unique(np.concatenate([dense_ids, lexical_ids]))
        return hybrid((candidates, self.vectors.scores_for(vector, candidates)),
                      (candidates, self.lexical.scores_for(text, candidates)), alpha, k)

    @staticmethod
    def is_follow_up(question: str) -> bool:
        """A question that points back (that, it, those...) or has at most 2 content words."""
        return bool(REFERRING & set(re.findall(r"\w+", question.casefold()))) or len(words(question)) <= 2

    def topic_of(self, history: Sequence[str]) -> str:
        """The last earlier question that stood on its own (else the first one)."""
        return next((q for q in reversed(history) if not self.is_follow_up(q)), history[0])

    def ask(self, question: str, history: Sequence[str] = (), k: int = 5, threshold: float | None = None,
            previous: str | None = None) -> dict[str, Any]:
        """The best entry for ``question``. ``history`` holds the session's earlier user
        questions, oldest first; a follow-up (``is_follow_up``) is searched with its topic
        (``topic_of``): the two question vectors summed (the topic at weight 0.7), BM25 on
        both texts, and the entry that answered the topic (``previous``, an entry id) left
        out, since a follow-up asks something further about it. On 15 follow-ups written
        for the construction FAQ this found 10 against 0 for the question alone and 4 for
        the two texts embedded together (benchmarks/support.py)."""
        question = question.strip()
        if not question:
            raise DataError("the question is empty")
        query, vector, exclude = question, self.query_vector(question), None
        if history and self.is_follow_up(question):
            topic = self.topic_of(history)
            query = f"{topic} {question}"
            mixed = vector + FOLLOW_UP_WEIGHT * self.query_vector(topic)
            vector = mixed / max(float(np.linalg.norm(mixed)), 1e-12)
            if previous is None:
                previous = self.entries[int(self.rank(topic, self.query_vector(topic), self.alpha, 1)[0][0])].id
            exclude = self.position.get(previous)
        ids, scores = self.rank(query, vector, self.alpha, k + 1)
        keep = [i for i, entry in enumerate(ids) if int(entry) != exclude][:k]
        ids, scores = ids[keep], scores[keep]
        top = self.entries[int(ids[0])]
        limit = self.threshold if threshold is None else threshold
        handoff = float(scores[0]) < limit
        result: dict[str, Any] = {
            "question": question, "query": query, "answer": top.answer, "score": round(float(scores[0]), 4),
            "entry": {"id": top.id, "question": top.question, "category": top.category},
            "handoff": handoff, "threshold": limit,
            "candidates": [{"id": self.entries[int(i)].id, "question": self.entries[int(i)].question,
                            "score": round(float(s), 4)} for i, s in zip(ids, scores, strict=True)],
        }
        if handoff:
            result["reason"] = f"confidence {float(scores[0]):.3f} is below the handoff threshold {limit:.3f}"
        if self.category is not None:
            probabilities = self.category.probabilities(vector)  # the question as resolved with its history
            best = int(np.argmax(probabilities))
            result["category"] = {"label": self.category.labels[best], "probability": round(float(probabilities[best]), 4)}
        return result


# ----------------------------------------------------------------------------- grounded generation
SYSTEM_PROMPT = ("You are a customer-service assistant. Answer the customer's question using only the numbered "
                 "passages. Cite the passage you used like [1]. Keep it short.")


def support_of(text: str, passages: Sequence[str]) -> float:
    """Share of the answer's content words (3+ letters) that occur in the passages."""
    answer = [w for w in words(text) if len(w) >= 3]
    if not answer:
        return 0.0
    known = {w for p in passages for w in words(p)}
    return sum(w in known for w in answer) / len(answer)


class GroundedWriter:
    """Writes an answer with a decoder from the retrieved passages alone, citing them; when
    the text is not supported by the passages (under ``min_support`` of its content words
    found there) the caller gets the retrieved text instead."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int = 120, min_support: float = 0.8) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.min_support = max_new_tokens, min_support
        self.lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> GroundedWriter:
        from lmforge.checkpoint import load_pretrained

        model, tokenizer = load_pretrained(path)
        if not getattr(model, "causal", False):
            raise ConfigError([f"--generator {path}: needs a decoder (e.g. SmolLM2); this is an encoder"])
        model.eval()
        return cls(model, tokenizer, **kwargs)

    def prompt(self, question: str, passages: Sequence[str]) -> str:
        numbered = "\n".join(f"[{i + 1}] {p}" for i, p in enumerate(passages))
        user = f"Passages:\n{numbered}\n\nQuestion: {question}"
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                                       {"role": "user", "content": user}])  # type: ignore[no-any-return]
        return f"{SYSTEM_PROMPT}\n\n{user}\nAnswer:"

    def write(self, question: str, passages: Sequence[str]) -> dict[str, Any]:
        from lmforge.generation import GenerationConfig, generate

        retrieved, passages = list(passages), list(passages)
        room = int(self.model.config.max_position_embeddings) - self.max_new_tokens
        prompt = self.prompt(question, passages)
        while len(self.tokenizer.encode(prompt)) > room:  # fewer passages, then a shorter last one
            if len(passages) > 1:
                passages.pop()
            else:
                words_left = passages[0].split()
                if len(words_left) <= 8:
                    raise ConfigError([f"the question and one passage do not fit the decoder's {room} positions "
                                       f"left after {self.max_new_tokens} new tokens"])
                passages[0] = " ".join(words_left[: len(words_left) * 3 // 4])
            prompt = self.prompt(question, passages)
        with self.lock:
            text = generate(self.model, self.tokenizer, prompt,
                            GenerationConfig(max_new_tokens=self.max_new_tokens))[0].strip()
        cited = sorted({int(n) for n in re.findall(r"\[(\d+)\]", text) if 1 <= int(n) <= len(passages)})
        support = support_of(re.sub(r"\[\d+\]", " ", text), passages)
        if support < self.min_support:
            return {"answer": retrieved[0], "generated": False, "support": round(support, 3), "citations": [1],
                    "draft": text, "fallback": f"the written answer had {support:.0%} of its words in the retrieved "
                                                f"passages (needs {self.min_support:.0%}): the retrieved text is given"}
        return {"answer": text, "generated": True, "support": round(support, 3), "citations": cited or [1]}


# ----------------------------------------------------------------------------- sessions
@dataclass
class Session:
    id: str
    turns: list[dict[str, Any]] = field(default_factory=list)
    touched: float = field(default_factory=time.time)

    def questions(self) -> list[str]:
        return [t["content"] for t in self.turns if t["role"] == "user"]


class Assistant:
    """Sessions over a KB: follow-ups read with the history, optional grounded writing, and a
    log of every handoff (JSON Lines). Sessions idle for ``ttl_s`` or beyond ``max_sessions``
    (the least recent first) are forgotten."""

    def __init__(self, kb: KnowledgeBase, writer: GroundedWriter | None = None, log_dir: str | Path | None = None,
                 max_sessions: int = 10_000, ttl_s: float = 3600.0, max_turns: int = 40) -> None:
        self.kb, self.writer = kb, writer
        self.log_path = Path(log_dir) / "handoffs.jsonl" if log_dir else None
        self.max_sessions, self.ttl_s, self.max_turns = max_sessions, ttl_s, max_turns
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.lock = threading.Lock()

    def session(self, session_id: str | None) -> Session:
        now = time.time()
        with self.lock:
            for stale in [k for k, s in self.sessions.items() if now - s.touched > self.ttl_s]:
                del self.sessions[stale]
            if session_id and session_id in self.sessions:
                found = self.sessions.pop(session_id)
            else:
                found = Session(session_id or uuid.uuid4().hex)
            found.touched = now
            self.sessions[found.id] = found
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)
            return found

    def chat(self, message: str, session_id: str | None = None, generate: bool = False) -> dict[str, Any]:
        session = self.session(session_id)
        answered = [t for t in session.turns if t["role"] == "assistant" and not t["handoff"]]
        result = self.kb.ask(message, history=session.questions(),
                             previous=answered[-1]["entry"] if answered else None)
        if generate and not result["handoff"]:
            if self.writer is None:
                raise ConfigError(["generative answers need a decoder: start with --generator MODEL"])
            passages = [self.kb.entries[self.kb.position[c["id"]]].answer for c in result["candidates"][:3]]
            result.update(self.writer.write(result["query"], passages))
        if result["handoff"]:
            result["answer"] = "I am not sure I have the right answer to that; I am passing your question to a " \
                               "colleague, who will reply here."
            self._log_handoff(session, result)
        session.turns.append({"role": "user", "content": message})
        session.turns.append({"role": "assistant", "content": result["answer"], "entry": result["entry"]["id"],
                              "handoff": result["handoff"]})
        del session.turns[: max(0, len(session.turns) - self.max_turns)]
        result["session_id"] = session.id
        return result

    def _log_handoff(self, session: Session, result: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), "session_id": session.id, "question": result["question"],
                  "score": result["score"], "threshold": result["threshold"], "best_entry": result["entry"]["id"],
                  "history": session.questions()}
        log.info("handoff: %s", json.dumps(record, ensure_ascii=False))
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.lock, open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def handoffs(self, limit: int = 50) -> list[dict[str, Any]]:
        if self.log_path is None or not self.log_path.exists():
            return []
        lines = self.log_path.read_text(encoding="utf-8").splitlines()[-limit:]
        return [json.loads(line) for line in lines if line.strip()]


# ----------------------------------------------------------------------------- evaluation
def evaluation_entries(kb: KnowledgeBase, data: str | Path | None = None, question_field: str = "question",
                       answer_field: str = "answer", id_field: str | None = None) -> list[tuple[FaqEntry, int]]:
    """(question, gold entry position) pairs: the KB's held-out test questions, or a file
    whose gold is an entry id (``id_field``) or the text of an answer in the KB."""
    if data is None:
        held = [(e, kb.position[e.id]) for e in kb.entries if e.split == "test"]
        if not held:
            raise DataError("the knowledge base holds no test questions (built with test_share 0): pass --data FILE")
        return held
    by_answer = {" ".join(e.answer.split()): i for i, e in enumerate(kb.entries)}
    fields = {"question": question_field, "gold": id_field or answer_field}
    pairs = []
    for record in read_examples(data, fields):
        gold = str(record["gold"])
        position = kb.position.get(gold) if id_field else by_answer.get(" ".join(gold.split()))
        if position is None:
            raise DataError(f"{record['_source']}: the gold {'id' if id_field else 'answer'} is not in the knowledge "
                            "base")
        entry = kb.entries[position]
        pairs.append((FaqEntry(entry.id, str(record["question"]), entry.answer, entry.category, record["_source"]),
                      position))
    return pairs


def evaluate_kb(kb: KnowledgeBase, pairs: Sequence[tuple[FaqEntry, int]]) -> dict[str, Any]:
    """Per ranker (bm25, dense, hybrid as built): hit@1/5/10, MRR@10; and for the hybrid,
    category accuracy and latency per question (p50 / p99 ms, encoder + both indexes)."""
    rows: dict[str, dict[str, float]] = {}
    gold = [position for _, position in pairs]
    latencies = []
    ranked_hybrid = []
    categories_right = categories_total = handed = 0
    vectors = kb.encoder.embed([entry.question for entry, _ in pairs])  # one batch for the dense ranker
    for entry, _ in pairs:
        started = time.perf_counter()
        result = kb.ask(entry.question, k=10)
        latencies.append((time.perf_counter() - started) * 1000)
        ranked_hybrid.append([kb.position[c["id"]] for c in result["candidates"]])
        handed += result["handoff"]
        if "category" in result and entry.category:
            categories_total += 1
            categories_right += result["category"]["label"] == entry.category
    ranked_dense = [kb.vectors.search(v, 10)[0].tolist() for v in vectors]
    ranked_bm25 = [kb.lexical.search(e.question, 10)[0].tolist() for e, _ in pairs]
    for name, ranked in (("bm25", ranked_bm25), ("dense", ranked_dense), ("hybrid", ranked_hybrid)):
        metrics = retrieval_metrics(ranked, gold)
        rows[name] = {k: round(metrics[k], 4) for k in ("hit@1", "hit@5", "hit@10", "mrr@10")}
    summary: dict[str, Any] = {"questions": len(pairs), **rows["hybrid"], "rankers": rows, "alpha": kb.alpha,
                               "latency_ms_p50": round(float(np.percentile(latencies, 50)), 2),
                               "latency_ms_p99": round(float(np.percentile(latencies, 99)), 2)}
    if categories_total:
        summary["category_accuracy"] = round(categories_right / categories_total, 4)
        summary["category_of_entry_accuracy"] = round(
            sum(kb.entries[r[0]].category == e.category for r, (e, _) in zip(ranked_hybrid, pairs, strict=True)) / len(pairs), 4)
    summary["handoff_share"] = round(handed / len(pairs), 4)
    return summary

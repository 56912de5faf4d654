"""Text-based recommendation: a two-tower model over item text and user history, an item
co-occurrence signal, cold-start items seen only as text, and the classic baselines.

    build_rec(interactions, items, output)     files -> a REC folder (split, trained, indexed)
    Recommender.load(REC).for_user(id, n)      top-n items, never ones the user already has
    Recommender.load(REC).similar(item, n)     items like one item (text + co-occurrence)
    evaluate_rec(rec)                          NDCG@10, recall@10, hit@10, coverage, cold-start
                                               recall@10 for every ranker on the held-out split

Towers (one shared encoder, MiniLM-L6 by default): the item tower reads an item's text (the
chosen fields, e.g. title, year and genres); the user tower reads the texts of the user's
most recent items, newest first. Trained with in-batch negatives on (history before an
interaction, the item of that interaction) pairs from the training interactions, through
lmforge's trainer.

Split (``split="random"``: 20% of interactions by a seeded hash; ``"time"``: each user's last
20% by time): a share of the *items* (10%) is held out first. These cold-start items lose all
their interactions to the test side, so no trained part ever sees them: they are in the index
as text only. 10% of the remaining training interactions choose the hybrid's weight; every
ranker (baselines included) is fitted on the same rest.

Rankers on the same split: MostPopular, ItemKNN (cosine item-item on the binary matrix, 100
neighbours), BM25 on item text (the history's text as the query), two-tower, and hybrid
(two-tower + ItemKNN, each min-max scaled per user, weight chosen on validation).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmforge.apps.folder import load_encoder_and_vectors, open_folder, read_jsonl
from lmforge.data.corpora import package_dir, split_of
from lmforge.data.sources import read_examples
from lmforge.errors import ConfigError, CorruptFileError, DataError
from lmforge.eval.metrics import coverage, retrieval_metrics
from lmforge.fileio import atomic_directory, folder_manifest, read_json, sha256_file, write_json
from lmforge.retrieval.encoder import Pair, SentenceEncoder, packaged_minilm, train_bi_encoder
from lmforge.retrieval.index import LexicalIndex, VectorIndex

log = logging.getLogger("lmforge.apps.recommend")
REC_VERSION = 1
ALPHAS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # two-tower weight in the hybrid
NEIGHBOURS = 100  # ItemKNN neighbours kept per item
# Interaction data that installs with a package (read where installed, never copied)
PACKAGED = {
    "ml-100k": ("recbole", "dataset_example/ml-100k/ml-100k.inter", "dataset_example/ml-100k/ml-100k.item",
                {"user": "user_id", "item": "item_id", "rating": "rating", "time": "timestamp"},
                {"item": "item_id", "text": ["movie_title", "release_year", "class"]},
                "pip install --no-deps recbole", "MovieLens-100k, GroupLens (research use; no redistribution)"),
}


# ----------------------------------------------------------------------------- reading
@dataclass
class Interaction:
    user: str
    item: str
    rating: float | None
    time: float | None
    source: str
    split: str = "train"  # train | validation | test | cold


def read_items(path: str | Path, item_field: str = "item", text_fields: Sequence[str] = ("title",)) -> dict[str, str]:
    """item id -> its text (the text fields joined, empty ones skipped). Errors name
    file:line: a missing id, an item without any text, an id twice."""
    fields = {"item": item_field, **{f"text:{name}": name for name in text_fields}}
    items: dict[str, str] = {}
    where: dict[str, str] = {}
    for record in read_examples(path, fields, required=["item"]):
        item = str(record["item"]).strip()
        parts = [str(record[f"text:{name}"]).strip() for name in text_fields if record.get(f"text:{name}") is not None]
        text = " ".join(p for p in parts if p)
        if not text:
            raise DataError(f"{record['_source']}: item {item!r} has no text in {', '.join(text_fields)}")
        if item in items:
            raise DataError(f"{record['_source']}: item {item!r} is also at {where[item]}")
        items[item], where[item] = text, record["_source"]
    return items


def read_interactions(path: str | Path, items: dict[str, str], user_field: str = "user", item_field: str = "item",
                      rating_field: str | None = "rating", time_field: str | None = "time") -> list[Interaction]:
    """Interactions, checked: missing fields, ratings or times that are not numbers, items not
    in the items file, and the same (user, item) twice are errors naming file:line."""
    fields = {"user": user_field, "item": item_field}
    if rating_field:
        fields["rating"] = rating_field
    if time_field:
        fields["time"] = time_field
    out: list[Interaction] = []
    seen: dict[tuple[str, str], str] = {}
    for record in read_examples(path, fields):
        source = record["_source"]
        values: dict[str, float | None] = {"rating": None, "time": None}
        for name in ("rating", "time"):
            if name in record:
                try:
                    values[name] = float(record[name])
                except (TypeError, ValueError):
                    raise DataError(f"{source}: {name} {record[name]!r} (field {fields[name]!r}) is not a "
                                    "number") from None
                if not math.isfinite(values[name]):  # type: ignore[arg-type]
                    raise DataError(f"{source}: {name} {record[name]!r} is not a finite number")
        user, item = str(record["user"]).strip(), str(record["item"]).strip()
        if item not in items:
            raise DataError(f"{source}: item {item!r} is not in the items file")
        if (user, item) in seen:
            raise DataError(f"{source}: user {user!r} and item {item!r} are also at {seen[(user, item)]} "
                            "(one row per user and item; keep the latest)")
        seen[(user, item)] = source
        out.append(Interaction(user, item, values["rating"], values["time"], source))
    return out


def resolve_data(interactions: str, items: str | None, fields: dict[str, str | None],
                 text_fields: Sequence[str] | None) -> tuple[Path, Path, dict[str, str | None], list[str], str]:
    """Paths, fields and provenance of user files or of packaged data (``corpus:ml-100k``)."""
    if interactions.startswith("corpus:"):
        name = interactions.removeprefix("corpus:")
        if name not in PACKAGED:
            raise DataError(f"{interactions}: unknown packaged data (known: {', '.join('corpus:' + n for n in PACKAGED)})")
        module, inter, item, inter_fields, item_fields, install, licence = PACKAGED[name]
        root = package_dir(module, install)
        chosen = {k: fields.get(k) or v for k, v in inter_fields.items()}
        chosen["item_id"] = fields.get("item_id") or item_fields["item"]  # type: ignore[assignment]
        return root / inter, root / item, chosen, list(text_fields or item_fields["text"]), f"{module}: {licence}"
    if not items:
        raise DataError("--items FILE is needed with your own interactions (item id and text fields)")
    chosen = {"user": fields.get("user") or "user", "item": fields.get("item") or "item",
              "rating": fields.get("rating"), "time": fields.get("time"), "item_id": fields.get("item_id") or
              fields.get("item") or "item"}
    return Path(interactions), Path(items), chosen, list(text_fields or ["title"]), "user files"


# ----------------------------------------------------------------------------- splitting
def split_interactions(rows: list[Interaction], items: Sequence[str], how: str = "random", test_share: float = 0.2,
                       cold_share: float = 0.1, validation_share: float = 0.1, seed: int = 0) -> set[str]:
    """Mark each row's ``split`` in place; returns the cold-start items (held out whole)."""
    if how not in ("random", "time"):
        raise ConfigError([f"split={how!r}: must be 'random' or 'time'"])
    cold = {i for i in items if split_of(f"cold:{seed}:{i}", 0.0, cold_share) == "test"}
    warm_rows = []
    for row in rows:
        if row.item in cold:
            row.split = "cold"
        else:
            warm_rows.append(row)
    if how == "random":
        for row in warm_rows:
            row.split = "test" if split_of(f"{seed}:{row.user}:{row.item}", 0.0, test_share) == "test" else "train"
    else:
        by_user: dict[str, list[Interaction]] = defaultdict(list)
        for row in warm_rows:
            by_user[row.user].append(row)
        for history in by_user.values():
            history.sort(key=lambda r: (r.time if r.time is not None else 0.0, r.source))
            cut = len(history) - int(round(len(history) * test_share))
            for position, row in enumerate(history):
                row.split = "train" if position < cut else "test"
    for row in rows:
        if row.split == "train" and split_of(f"validation:{seed}:{row.user}:{row.item}", 0.0,
                                             validation_share) == "test":
            row.split = "validation"
    return cold


# ----------------------------------------------------------------------------- the rankers
class Catalogue:
    """Items in a fixed order, the fitted interactions as a user x item matrix, popularity
    and the ItemKNN neighbours."""

    def __init__(self, item_ids: list[str], texts: list[str], histories: dict[str, list[str]]) -> None:
        self.item_ids, self.texts = item_ids, texts
        self.position = {item: i for i, item in enumerate(item_ids)}
        self.histories = histories  # user -> fitted items, oldest first
        self.popularity = np.zeros(len(item_ids), dtype=np.float32)
        for history in histories.values():
            for item in history:
                self.popularity[self.position[item]] += 1
        self.neighbours, self.weights = item_knn(self.matrix(), NEIGHBOURS)
        from scipy.sparse import csr_matrix

        rows = np.repeat(np.arange(len(item_ids)), self.neighbours.shape[1])
        self.similarity = csr_matrix((self.weights.ravel(), (rows, self.neighbours.ravel())),
                                     shape=(len(item_ids), len(item_ids)))
        self.unseen = np.flatnonzero(self.popularity == 0)  # items no fitted row has: cold-start
        self.text_neighbours: tuple[np.ndarray, np.ndarray] | None = None

    def matrix(self) -> Any:
        from scipy.sparse import csr_matrix

        rows, cols = [], []
        for row, history in enumerate(self.histories.values()):
            rows.extend([row] * len(history))
            cols.extend(self.position[i] for i in history)
        return csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)),
                          shape=(max(len(self.histories), 1), len(self.item_ids)))

    def item_ids_of(self, positions: np.ndarray) -> list[str]:
        return [self.item_ids[int(p)] for p in positions]

    def seen(self, user: str) -> np.ndarray:
        return np.array([self.position[i] for i in self.histories.get(user, [])], dtype=np.int64)

    def knn_scores(self, user: str) -> np.ndarray:
        """ItemKNN: the sum of the similarities of each item to the user's items."""
        seen = self.seen(user)
        if not len(seen):
            return np.zeros(len(self.item_ids), dtype=np.float32)
        return np.asarray(self.similarity[seen].sum(axis=0)).ravel().astype(np.float32)

    def lend_text_neighbours(self, vectors: np.ndarray, k: int = 5) -> None:
        """Give each item without interactions the ``k`` interacted items nearest in text, so
        that it can borrow their co-occurrence scores (``with_borrowed``)."""
        warm = np.flatnonzero(self.popularity > 0)
        if not len(self.unseen) or not len(warm):
            return
        similarity = vectors[self.unseen] @ vectors[warm].T
        k = min(k, len(warm))
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        weights = np.clip(np.take_along_axis(similarity, nearest, axis=1), 0.0, None)
        weights = weights / np.maximum(weights.sum(1, keepdims=True), 1e-12)
        self.text_neighbours = (warm[nearest], weights.astype(np.float32))

    def with_borrowed(self, knn: np.ndarray) -> np.ndarray:
        """ItemKNN scores where each never-interacted item takes the text-weighted mean of its
        text neighbours' scores (collaborative signal lent through text)."""
        if self.text_neighbours is None:
            return knn
        neighbours, weights = self.text_neighbours
        out = knn.copy()
        out[self.unseen] = (knn[neighbours] * weights).sum(1)
        return out


def item_knn(matrix: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(items x k) neighbour ids and cosine similarities on the binary interaction matrix."""
    columns = matrix.T.tocsr().astype(np.float32)
    norms = np.sqrt(np.asarray(columns.multiply(columns).sum(1)).ravel())
    norms[norms == 0] = 1.0
    similarity = (columns @ columns.T).toarray() / norms[:, None] / norms[None, :]
    np.fill_diagonal(similarity, 0.0)
    k = min(k, similarity.shape[0] - 1) if similarity.shape[0] > 1 else 1
    neighbours = np.argpartition(-similarity, k - 1, axis=1)[:, :k] if similarity.shape[0] > 1 else \
        np.zeros((similarity.shape[0], 1), dtype=np.int64)
    weights = np.take_along_axis(similarity, neighbours, axis=1).astype(np.float32)
    return neighbours.astype(np.int64), weights


def scaled(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Min-max scaling over the candidate items (``mask`` True)."""
    if not mask.any():
        return np.zeros_like(scores)
    low, high = scores[mask].min(), scores[mask].max()
    return (scores - low) / (high - low) if high > low else np.zeros_like(scores)


def top_n(scores: np.ndarray, exclude: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` best scores, ``exclude`` left out, best first (ties by position)."""
    scores = scores.astype(np.float64, copy=True)
    scores[exclude] = -np.inf
    n = min(n, int(np.isfinite(scores).sum()))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    chosen = np.argpartition(-scores, n - 1)[:n]
    return chosen[np.lexsort((chosen, -scores[chosen]))]


# ----------------------------------------------------------------------------- building
@dataclass
class RecConfig:
    split: str = "random"
    test_share: float = 0.2
    cold_share: float = 0.1
    validation_share: float = 0.1
    history: int = 10  # most recent items the user tower reads
    logq: bool = True  # correct in-batch negatives for item popularity while training (Yi et al. 2019)
    lend_cold: bool = False  # cold-start items borrow the co-occurrence score of their text neighbours
    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-5
    seed: int = 0
    max_tokens: int = 256

    def __post_init__(self) -> None:
        problems = []
        for name in ("test_share", "cold_share", "validation_share"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)}: must be in [0, 1)")
        if self.split not in ("random", "time"):
            problems.append(f"split={self.split!r}: must be random or time")
        if self.history < 1:
            problems.append(f"history={self.history}: must be >= 1")
        if self.steps < 0:
            problems.append(f"steps={self.steps}: must be >= 0 (0 keeps the encoder untuned)")
        if problems:
            raise ConfigError(problems, where="recommend build")


def user_text(history: Sequence[str], texts: dict[str, str], length: int) -> str:
    """The user tower's input: the texts of the ``length`` most recent items, newest first."""
    return "; ".join(texts[item] for item in reversed(list(history)[-length:]))


def build_rec(interactions: str, output: str | Path, items: str | None = None, model: str | Path | None = None,
              user_field: str | None = None, item_field: str | None = None, rating_field: str | None = None,
              time_field: str | None = None, item_id_field: str | None = None,
              text_fields: Sequence[str] | None = None, config: RecConfig | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Read, split, fit the baselines, train the towers, index the items, choose the hybrid
    weight on validation; write the REC folder atomically. Returns rec.json."""
    from lmforge.checkpoint import load_pretrained, save_model

    config = config or RecConfig()
    inter_path, item_path, fields, text_fields, provenance = resolve_data(
        interactions, items, {"user": user_field, "item": item_field, "rating": rating_field, "time": time_field,
                              "item_id": item_id_field}, text_fields)
    texts = read_items(item_path, fields["item_id"], text_fields)  # type: ignore[arg-type]
    rows = read_interactions(inter_path, texts, fields["user"], fields["item"], fields["rating"],  # type: ignore[arg-type]
                             fields["time"])
    if config.split == "time" and any(r.time is None for r in rows):
        raise ConfigError(["split=time needs a time field (--time-field)"], where="recommend build")
    item_ids = list(texts)
    cold = split_interactions(rows, item_ids, config.split, config.test_share, config.cold_share,
                              config.validation_share, config.seed)
    histories = fitted_histories(rows, ("train",))
    source = Path(model) if model else packaged_minilm()
    encoder_model, tokenizer = load_pretrained(source)
    if tokenizer is None:
        raise DataError(f"{source}: the encoder folder has no tokenizer")
    encoder = SentenceEncoder(encoder_model, tokenizer, config.max_tokens)
    started = time.perf_counter()
    training: dict[str, Any] = {"steps": 0}
    if config.steps > 0:
        pairs = training_pairs(histories, texts, config.history, config.steps * config.batch_size, config.seed,
                               config.logq)
        with tempfile.TemporaryDirectory(prefix="lmforge-recommend-") as scratch:
            summary = train_bi_encoder(encoder, pairs, Path(scratch) / "run", steps=config.steps,
                                       batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                                       progress=progress)
        training = {"steps": int(summary["steps"]), "pairs": len(pairs), "batch_size": config.batch_size,
                    "lr": config.lr, "logq": config.logq}
    training["seconds"] = round(time.perf_counter() - started, 1)
    vectors = VectorIndex.build(encoder.embed([texts[i] for i in item_ids]))
    rec = Recommender(Catalogue(item_ids, [texts[i] for i in item_ids], histories), encoder, vectors,
                      LexicalIndex.build([texts[i] for i in item_ids]), alpha=0.5, history=config.history,
                      settings={"lend_cold": config.lend_cold})
    rec.cache_users()
    validation = relevant_by_user(rows, ("validation",))
    rec.alpha, alpha_scores = choose_alpha(rec, validation)
    final = Recommender(Catalogue(item_ids, [texts[i] for i in item_ids], fitted_histories(rows)), encoder, vectors,
                        rec.lexical, rec.alpha, config.history, {"lend_cold": config.lend_cold})
    final.cache_users()  # the weight is chosen; the validation rows now join the history
    rec = final
    settings = {
        "version": REC_VERSION, "alpha": rec.alpha, "history": config.history, "max_tokens": encoder.max_tokens,
        "lend_cold": config.lend_cold,
        "data": {"interactions": str(inter_path.resolve()), "items": str(item_path.resolve()),
                 "sha256": {"interactions": sha256_file(inter_path), "items": sha256_file(item_path)},
                 "fields": fields, "text_fields": list(text_fields), "provenance": provenance,
                 "rows": len(rows), "users": len({r.user for r in rows}), "item_count": len(item_ids)},
        "split": {"how": config.split, "test_share": config.test_share, "cold_share": config.cold_share,
                  "validation_share": config.validation_share, "seed": config.seed, "cold_items": len(cold),
                  "counts": {s: sum(r.split == s for r in rows) for s in ("train", "validation", "test", "cold")}},
        "encoder": {"source": str(source), "trained": training},
        "validation": {"alpha_ndcg@10": alpha_scores},
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rec.settings = settings
    with atomic_directory(Path(output)) as folder:
        save_model(encoder.model, folder / "encoder", tokenizer)
        (folder / "index").mkdir()
        vectors.save(folder / "index")
        rec.lexical.save(folder / "index")
        np.save(folder / "index" / "users.npy", rec.user_vectors, allow_pickle=False)
        write_json(folder / "index" / "users.json", list(rec.user_rows))
        with open(folder / "items.jsonl", "w", encoding="utf-8") as handle:
            for item in item_ids:
                handle.write(json.dumps({"item": item, "text": texts[item], "cold": item in cold},
                                        ensure_ascii=False) + "\n")
        with open(folder / "interactions.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps({"user": row.user, "item": row.item, "time": row.time, "split": row.split},
                                        ensure_ascii=False) + "\n")
        write_json(folder / "rec.json", settings)
        write_json(folder / "manifest.json", folder_manifest(folder))
    return settings


def fitted_histories(rows: Sequence[Interaction], splits: Sequence[str] = ("train", "validation")
                     ) -> dict[str, list[str]]:
    """user -> the items of their rows in ``splits``, oldest first (every user, even with
    none). The hybrid's weight is chosen with the training rows alone; the recommender then
    knows the validation rows too (popularity, ItemKNN, user vectors, items left out)."""
    by_user: dict[str, list[Interaction]] = {r.user: [] for r in rows}
    for row in rows:
        if row.split in splits:
            by_user[row.user].append(row)
    return {user: [r.item for r in sorted(history, key=lambda r: (r.time or 0.0, r.source))]
            for user, history in by_user.items()}


def relevant_by_user(rows: Sequence[Interaction], splits: Sequence[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if row.split in splits:
            out[row.user].add(row.item)
    return dict(out)


def training_pairs(histories: dict[str, list[str]], texts: dict[str, str], length: int, count: int,
                   seed: int, logq: bool = False) -> list[Pair]:
    """``count`` (history text, next item text) pairs drawn without replacement (seeded) from
    every position after a user's first training item; with ``logq`` each pair carries the
    log of its item's share of all positives (``ContrastiveObjective``'s correction)."""
    positions = [(user, p) for user, history in histories.items() for p in range(1, len(history))]
    if len(positions) < 2:
        raise DataError("the training interactions give fewer than 2 (history, next item) pairs: each user needs "
                        "at least 2 training interactions for the towers to learn from")
    counts: dict[str, int] = defaultdict(int)
    for user, p in positions:
        counts[histories[user][p]] += 1
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(positions), size=min(count, len(positions)), replace=False)
    pairs = []
    for index in chosen:
        user, p = positions[int(index)]
        history = histories[user]
        log_q = math.log(counts[history[p]] / len(positions)) if logq else 0.0
        pairs.append(Pair(user_text(history[:p], texts, length), texts[history[p]], history[p], log_q))
    return pairs


def choose_alpha(rec: Recommender, relevant: dict[str, set[str]]) -> tuple[float, dict[str, float]]:
    """The two-tower weight of the hybrid with the best validation NDCG@10 (0.5 without)."""
    users = [u for u in relevant if rec.catalogue.histories.get(u)]
    if not users:
        return 0.5, {}
    parts = {u: rec.parts(u) for u in users}
    scores = {}
    for alpha in ALPHAS:
        ranked = [rec.catalogue.item_ids_of(rec.blend(parts[u], alpha, 10)) for u in users]
        scores[str(alpha)] = round(retrieval_metrics(ranked, [relevant[u] for u in users], ks=(10,))["ndcg@10"], 4)
    best = max(ALPHAS, key=lambda a: (scores[str(a)], a))
    return best, scores


# ----------------------------------------------------------------------------- recommending
class Recommender:
    """A loaded REC folder: recommendations for users and similar items."""

    def __init__(self, catalogue: Catalogue, encoder: SentenceEncoder, vectors: VectorIndex, lexical: LexicalIndex,
                 alpha: float, history: int, settings: dict[str, Any]) -> None:
        self.catalogue, self.encoder, self.vectors, self.lexical = catalogue, encoder, vectors, lexical
        self.alpha, self.history, self.settings = alpha, history, settings
        self.lend_cold = bool(settings.get("lend_cold", False))
        self.lock = threading.Lock()
        self.texts = dict(zip(catalogue.item_ids, catalogue.texts, strict=True))
        self.rows: list[dict[str, Any]] = []  # the split rows (evaluate_rec), read by load
        self.user_rows: dict[str, int] = {}
        self.user_vectors = np.zeros((0, vectors.vectors.shape[1]), dtype=np.float32)
        catalogue.lend_text_neighbours(vectors.vectors)

    def cache_users(self) -> None:
        """Embed every user with a history once (the towers' user side)."""
        users = [u for u, h in self.catalogue.histories.items() if h]
        self.user_vectors = self.embed_users(users) if users else self.user_vectors
        self.user_rows = {u: i for i, u in enumerate(users)}

    @classmethod
    def load(cls, folder: str | Path) -> Recommender:
        folder = Path(folder)
        settings = open_folder(folder, "rec.json", REC_VERSION, "recommender", "lmforge app recommend build")
        items = read_jsonl(folder / "items.jsonl")
        rows = read_jsonl(folder / "interactions.jsonl")
        histories = fitted_histories([Interaction(r["user"], r["item"], None, r["time"], f"{i:09d}", r["split"])
                                      for i, r in enumerate(rows)])
        catalogue = Catalogue([i["item"] for i in items], [i["text"] for i in items], histories)
        encoder, vectors = load_encoder_and_vectors(folder, settings["max_tokens"], len(items), items[0]["text"], "items")
        rec = cls(catalogue, encoder, vectors, LexicalIndex.load(folder / "index", len(items)), settings["alpha"],
                  settings["history"], settings)
        users = read_json(folder / "index" / "users.json")
        rec.user_vectors = np.load(folder / "index" / "users.npy", allow_pickle=False)
        if len(users) != len(rec.user_vectors):
            raise CorruptFileError(f"{folder}: users.json names {len(users)} users, users.npy holds "
                                   f"{len(rec.user_vectors)} vectors")
        rec.user_rows = {u: i for i, u in enumerate(users)}
        rec.rows = rows
        return rec

    # -- the parts of a user's scores
    def embed_users(self, users: Sequence[str]) -> np.ndarray:
        """User-tower vectors of ``users`` (each with a history), batched."""
        texts = [user_text(self.catalogue.histories[u], self.texts, self.history) for u in users]
        with self.lock:
            return self.encoder.embed(texts)

    def user_vector(self, user: str) -> np.ndarray | None:
        """The user's tower vector: computed once per user at build (``users.npy``)."""
        if not self.catalogue.histories.get(user):
            return None
        row = self.user_rows.get(user)
        return self.user_vectors[row] if row is not None else self.embed_users([user])[0]

    def parts(self, user: str) -> dict[str, np.ndarray]:
        """Per-item score arrays of one user: two-tower, ItemKNN, and the items to leave out."""
        vector = self.user_vector(user)
        tower = np.zeros(len(self.catalogue.item_ids), dtype=np.float32)
        if vector is not None:  # the faiss index scores every item (exact inner product)
            ids, scores = self.vectors.search(vector, len(tower))
            tower[ids] = scores
        knn = self.catalogue.knn_scores(user)
        return {"tower": tower, "knn": knn, "seen": self.catalogue.seen(user)}

    def blend(self, parts: dict[str, np.ndarray], alpha: float, n: int, lend: bool | None = None) -> np.ndarray:
        """Top ``n`` of ``alpha * tower + (1 - alpha) * ItemKNN`` (each min-max scaled over the
        items the user does not have); with ``lend`` (default: as built) cold-start items
        take the ItemKNN score lent by their text neighbours instead of 0."""
        mask = np.ones(len(parts["tower"]), dtype=bool)
        mask[parts["seen"]] = False
        lend = self.lend_cold if lend is None else lend
        knn = self.catalogue.with_borrowed(parts["knn"]) if lend else parts["knn"]
        score = alpha * scaled(parts["tower"], mask) + (1 - alpha) * scaled(knn, mask)
        return top_n(score, parts["seen"], n)

    def check_user(self, user: str) -> None:
        if user not in self.catalogue.histories:
            raise DataError(f"user {user!r} is not in the interactions of this recommender "
                            f"({len(self.catalogue.histories):,} users; e.g. {next(iter(self.catalogue.histories))!r})")

    def check_item(self, item: str) -> None:
        if item not in self.catalogue.position:
            raise DataError(f"item {item!r} is not in the catalogue ({len(self.catalogue.item_ids):,} items; e.g. "
                            f"{self.catalogue.item_ids[0]!r})")

    def for_user(self, user: str, n: int = 10) -> dict[str, Any]:
        """The top ``n`` items for a known user (hybrid); a user without history gets the most
        popular items."""
        self.check_user(user)
        history = self.catalogue.histories[user]
        if history:
            chosen, how = self.blend(self.parts(user), self.alpha, n), "hybrid"
        else:
            chosen, how = top_n(self.catalogue.popularity, np.zeros(0, dtype=np.int64), n), "popular (no history)"
        return {"user": user, "how": how, "history": [self.describe(self.catalogue.position[i]) for i in history[-5:]],
                "items": [self.describe(int(i)) for i in chosen]}

    def similar(self, item: str, n: int = 10) -> dict[str, Any]:
        """Items like ``item``: text cosine blended with co-occurrence (ItemKNN similarity)."""
        self.check_item(item)
        position = self.catalogue.position[item]
        text = self.vectors.vectors @ self.vectors.vectors[position]
        cooccurrence = np.zeros(len(text), dtype=np.float32)
        cooccurrence[self.catalogue.neighbours[position]] = self.catalogue.weights[position]
        mask = np.ones(len(text), dtype=bool)
        mask[position] = False
        score = self.alpha * scaled(text, mask) + (1 - self.alpha) * scaled(cooccurrence, mask)
        chosen = top_n(score, np.array([position]), n)
        return {"item": self.describe(position), "items": [self.describe(int(i)) for i in chosen]}

    def describe(self, position: int) -> dict[str, Any]:
        return {"item": self.catalogue.item_ids[position], "text": self.catalogue.texts[position],
                "popularity": int(self.catalogue.popularity[position])}


# ----------------------------------------------------------------------------- re-ranking
def reranker_pairs(rec: Recommender, count: int = 3000, negatives: int = 3, depth: int = 50,
                   seed: int = 0) -> list[dict[str, Any]]:
    """Training pairs for a ``pair-score`` cross-encoder re-ranker, from the training rows
    only: for a sampled (user, position) the query is the history text before it, the
    positive its item (label 1), and ``negatives`` items from the two-tower's top ``depth``
    for that user that the user never interacted with (label 0: hard negatives). ``group``
    keeps each query's pairs together for NDCG."""
    known = {user: set(history) for user, history in rec.catalogue.histories.items()}  # never the test rows
    positions = [(u, p) for u, h in rec.catalogue.histories.items() for p in range(1, len(h))]
    if not positions:
        raise DataError("no user has two training interactions: nothing to build re-ranker pairs from")
    rng = np.random.default_rng(seed)
    pairs: list[dict[str, Any]] = []
    for index in rng.choice(len(positions), size=min(count, len(positions)), replace=False):
        user, p = positions[int(index)]
        history = rec.catalogue.histories[user]
        query = user_text(history[:p], rec.texts, rec.history)
        group = f"{user}@{p}"
        pairs.append({"query": query, "item": rec.texts[history[p]], "label": 1, "group": group})
        parts = rec.parts(user)
        candidates = [i for i in rec.catalogue.item_ids_of(rec.blend(parts, 1.0, depth, lend=False))
                      if i not in known[user]]
        for item in rng.choice(candidates, size=min(negatives, len(candidates)), replace=False):
            pairs.append({"query": query, "item": rec.texts[str(item)], "label": 0, "group": group})
    return pairs


class Reranker:
    """A fine-tuned ``pair-score`` model (``lmforge finetune --task pair-score`` on
    ``reranker_pairs``) that re-orders the top ``depth`` of another ranker."""

    def __init__(self, folder: str | Path, depth: int = 20) -> None:
        from lmforge.tasks.loading import load_task_model

        self.task, self.objective = load_task_model(folder)
        if self.task.name != "pair-score":
            raise ConfigError([f"--reranker {folder}: a {self.task.name} model; the re-ranker is a pair-score model"])
        self.depth = depth

    def rerank(self, query: str, items: list[str], texts: dict[str, str]) -> list[str]:
        examples = [{"query": query, "item": texts[i], "_source": f"candidate {n}"} for n, i in enumerate(items)]
        features = self.task.encode_all(examples, labeled=False)
        _, predictions = self.task.evaluate(self.objective, examples, features, batch_size=len(examples),
                                            labeled=False)
        order = np.argsort([-p["probability"] for p in predictions], kind="stable")
        return [items[int(i)] for i in order]


# ----------------------------------------------------------------------------- evaluation
def evaluate_rec(rec: Recommender, k: int = 10, seed: int = 0, reranker: Reranker | None = None,
                 rerank_users: int = 200) -> dict[str, Any]:
    """Every ranker on the held-out rows: NDCG@k, recall@k, hit@k over users with warm test
    items (the warm metrics), catalogue coverage of the top-k lists, and recall@k on the
    cold-start items (users with a cold test item; ranked in the same full list). Also the
    latency of one hybrid recommendation (p50 / p99 ms). With a ``reranker``, the two-tower's
    and the hybrid's top ``reranker.depth`` are re-ordered for ``rerank_users`` sampled users
    (a cross-encoder is slow on a CPU), and every ranker is also scored on those users alone
    (``on_reranked_users``)."""
    rows = rec.rows
    if not rows:
        raise ConfigError(["evaluate_rec needs a loaded REC folder (Recommender.load)"])
    catalogue = rec.catalogue
    warm = relevant_by_user([Interaction(r["user"], r["item"], None, None, "", r["split"]) for r in rows], ("test",))
    cold = relevant_by_user([Interaction(r["user"], r["item"], None, None, "", r["split"]) for r in rows], ("cold",))
    users = sorted(set(warm) | set(cold))
    rng = np.random.default_rng(seed)
    rankers: dict[str, dict[str, list[str]]] = defaultdict(dict)
    latencies = []
    for user in users:
        seen = catalogue.seen(user)
        started = time.perf_counter()
        parts = rec.parts(user) if catalogue.histories.get(user) else None
        if parts is not None:
            rankers["hybrid"][user] = catalogue.item_ids_of(rec.blend(parts, rec.alpha, k))
            latencies.append((time.perf_counter() - started) * 1000)
            other = "hybrid, no lending" if rec.lend_cold else "hybrid + cold lending"
            rankers[other][user] = catalogue.item_ids_of(rec.blend(parts, rec.alpha, k, lend=not rec.lend_cold))
            rankers["two-tower"][user] = catalogue.item_ids_of(rec.blend(parts, 1.0, k, lend=False))
            rankers["ItemKNN"][user] = catalogue.item_ids_of(top_n(parts["knn"], seen, k))
            query = user_text(catalogue.histories[user], rec.texts, rec.history)
            rankers["BM25 (item text)"][user] = catalogue.item_ids_of(top_n(rec.lexical.all_scores(query), seen, k))
        else:  # no training history: the towers and ItemKNN fall back to popularity
            popular = catalogue.item_ids_of(top_n(catalogue.popularity, seen, k))
            for name in ("hybrid", "hybrid, no lending" if rec.lend_cold else "hybrid + cold lending", "two-tower",
                         "ItemKNN", "BM25 (item text)"):
                rankers[name][user] = popular
        rankers["MostPopular"][user] = catalogue.item_ids_of(top_n(catalogue.popularity, seen, k))
        rankers["random"][user] = catalogue.item_ids_of(top_n(rng.random(len(catalogue.item_ids)), seen, k))
    if reranker is not None:
        chosen = sorted(rng.choice([u for u in users if u in warm and catalogue.histories.get(u)],
                                   size=min(rerank_users, len(warm)), replace=False).tolist())
        for user in tqdm(chosen, desc="re-rank", unit="user", leave=False):
            parts = rec.parts(user)
            query = user_text(catalogue.histories[user], rec.texts, rec.history)
            for name, alpha in (("two-tower + re-ranker", 1.0), ("hybrid + re-ranker", rec.alpha)):
                top = catalogue.item_ids_of(rec.blend(parts, alpha, reranker.depth))
                rankers[name][user] = reranker.rerank(query, top, rec.texts)[:k]
    summary: dict[str, Any] = {"users": len(users), "warm_users": len(warm), "cold_users": len(cold),
                               "cold_items": len({r["item"] for r in rows if r["split"] == "cold"}),
                               "k": k, "rankers": {}}
    if reranker is not None:
        summary["on_reranked_users"] = {}
        for name, ranked in rankers.items():
            metrics = retrieval_metrics([ranked[u] for u in chosen], [warm[u] for u in chosen], ks=(k,))
            summary["on_reranked_users"][name] = {f"ndcg@{k}": round(metrics[f"ndcg@{k}"], 4),
                                                  f"recall@{k}": round(metrics[f"recall@{k}"], 4)}
        summary["reranked_users"] = len(chosen)
    for name, ranked in rankers.items():
        if name.endswith("re-ranker"):
            continue
        warm_users = [u for u in users if u in warm]
        metrics = retrieval_metrics([ranked[u] for u in warm_users], [warm[u] for u in warm_users], ks=(k,))
        cold_users = [u for u in users if u in cold]
        cold_metrics = retrieval_metrics([ranked[u] for u in cold_users], [cold[u] for u in cold_users], ks=(k,)) \
            if cold_users else {f"recall@{k}": float("nan")}
        summary["rankers"][name] = {f"ndcg@{k}": round(metrics[f"ndcg@{k}"], 4),
                                    f"recall@{k}": round(metrics[f"recall@{k}"], 4),
                                    f"hit@{k}": round(metrics[f"hit@{k}"], 4),
                                    "coverage": round(coverage([ranked[u] for u in users], len(catalogue.item_ids)), 4),
                                    f"cold_recall@{k}": round(cold_metrics[f"recall@{k}"], 4)}
    summary.update({f"{key}": value for key, value in summary["rankers"]["hybrid"].items()})
    if latencies:
        summary["latency_ms_p50"] = round(float(np.percentile(latencies, 50)), 2)
        summary["latency_ms_p99"] = round(float(np.percentile(latencies, 99)), 2)
    return summary

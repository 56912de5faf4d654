"""Vector, lexical and hybrid search over a fixed list of documents.

    VectorIndex.build(vectors)            faiss inner-product index over unit vectors
    LexicalIndex.build(texts)             BM25 (bm25s: Lucene's variant, k1=1.5, b=0.75)
    hybrid(dense, lexical, alpha)         one ranking from both

Both indexes answer ``scores_for(query, ids)`` as well as ``search(query, k)``, so the
hybrid ranks the union of both top-k lists with *both* scores for every candidate,
rather than fusing ranks blindly. Scores are put on one scale per query: the dense cosine
as it is, BM25 divided by its best score among the candidates (0..1). ``alpha`` weighs
the dense side. Everything is saved as plain arrays and JSON (faiss's own file format,
``.npy`` without pickles): nothing is unpickled at load.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmforge.errors import CorruptFileError, DataError

WORD = re.compile(r"\w+", re.UNICODE)
# Short English function words: BM25's idf already discounts them, but removing them keeps
# one-word overlaps such as "the" from deciding a ranking among near-ties.
STOPWORDS = frozenset(
    "a an and are as at be by for from has have how i if in is it its of on or that the their this to was "
    "what when where which who why will with you your do does can my me we our".split())


def words(text: str) -> list[str]:
    """Lower-cased word tokens (accents kept, CJK one token per character), stopwords out."""
    text = unicodedata.normalize("NFKC", text).lower()
    out: list[str] = []
    for token in WORD.findall(text):
        if any("\u4e00" <= ch <= "\u9fff" for ch in token):
            out.extend(token)  # Chinese: characters (no segmenter needed for BM25 recall)
        elif token not in STOPWORDS:
            out.append(token)
    return out


class VectorIndex:
    """Exact inner-product search (faiss ``IndexFlatIP``) over L2-normalised vectors."""

    def __init__(self, index: object, vectors: np.ndarray) -> None:
        self.index, self.vectors = index, vectors

    @classmethod
    def build(cls, vectors: np.ndarray) -> VectorIndex:
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or not len(vectors):
            raise DataError(f"a vector index needs a non-empty (N, D) array; got shape {vectors.shape}")
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return cls(index, vectors)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the ``k`` best documents, best first."""
        scores, ids = self.index.search(np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32),  # type: ignore[attr-defined]
                                        min(k, len(self)))
        return ids[0], scores[0]

    def scores_for(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return self.vectors[ids] @ query.reshape(-1)  # type: ignore[no-any-return]

    def save(self, folder: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(folder / "vectors.faiss"))
        np.save(folder / "vectors.npy", self.vectors, allow_pickle=False)

    @classmethod
    def load(cls, folder: Path) -> VectorIndex:
        import faiss

        try:
            vectors = np.load(folder / "vectors.npy", allow_pickle=False)
            index = faiss.read_index(str(folder / "vectors.faiss"))
        except (OSError, ValueError, RuntimeError) as error:
            raise CorruptFileError(f"{folder}: cannot read the vector index ({error})") from error
        if index.ntotal != len(vectors):
            raise CorruptFileError(f"{folder}: vectors.faiss holds {index.ntotal} vectors, vectors.npy {len(vectors)}")
        return cls(index, vectors)


class LexicalIndex:
    """BM25 over the documents' words (``words``)."""

    def __init__(self, retriever: object, size: int) -> None:
        self.retriever, self.size = retriever, size

    @classmethod
    def build(cls, texts: Sequence[str]) -> LexicalIndex:
        import bm25s

        tokens = [words(t) or [""] for t in texts]
        retriever = bm25s.BM25()
        retriever.index(tokens, show_progress=False)
        return cls(retriever, len(texts))

    def __len__(self) -> int:
        return self.size

    def all_scores(self, query: str) -> np.ndarray:
        """BM25 score of every document (0 where no query word occurs)."""
        tokens = [t for t in words(query) if t in self.retriever.vocab_dict]  # type: ignore[attr-defined]
        if not tokens:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self.retriever.get_scores(tokens), dtype=np.float32)  # type: ignore[attr-defined]

    def search(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = self.all_scores(query)
        k = min(k, self.size)
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return top, scores[top]

    def scores_for(self, query: str, ids: np.ndarray) -> np.ndarray:
        return self.all_scores(query)[ids]  # type: ignore[no-any-return]

    def save(self, folder: Path) -> None:
        self.retriever.save(str(folder / "bm25"))  # type: ignore[attr-defined]

    @classmethod
    def load(cls, folder: Path, size: int) -> LexicalIndex:
        import bm25s

        try:
            retriever = bm25s.BM25.load(str(folder / "bm25"), allow_pickle=False)
        except (OSError, ValueError, KeyError) as error:
            raise CorruptFileError(f"{folder}: cannot read the BM25 index ({error})") from error
        return cls(retriever, size)


def hybrid(dense: tuple[np.ndarray, np.ndarray], lexical: tuple[np.ndarray, np.ndarray], alpha: float,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fuse two score arrays over the same candidate ids: ``alpha * dense + (1 - alpha) *
    bm25 / max(bm25)``; (ids, fused scores) of the ``k`` best, best first.

    ``dense`` and ``lexical`` are (candidate ids, scores) with the same ids in the same order."""
    ids, dense_scores = dense
    lexical_ids, lexical_scores = lexical
    if not np.array_equal(ids, lexical_ids):
        raise ValueError("hybrid(): both sides must score the same candidates")
    top = float(lexical_scores.max()) if len(lexical_scores) else 0.0
    lexical_part = lexical_scores / top if top > 0 else np.zeros_like(lexical_scores)
    fused = alpha * dense_scores + (1.0 - alpha) * lexical_part
    order = np.argsort(-fused, kind="stable")[:k]
    return ids[order], fused[order]

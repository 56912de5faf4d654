"""Task metrics, computed by the libraries the field trusts.

Classification: scikit-learn (accuracy, macro-F1, MCC, confusion matrix). NER: seqeval
in strict mode, entity level (a predicted entity counts only when its type and both
boundaries match). Translation: sacrebleu BLEU and chrF. Summaries: rouge-score ROUGE-L.
Ranking: scikit-learn AUC and NDCG@k per query group. Extractive QA: the official
SQuAD v1.1/v2.0 exact-match and F1 definitions (answer normalisation, max over golds),
with Chinese compared character by character as CMRC does.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.fileio import save_figure


# ------------------------------------------------------------------ classification
def classification_metrics(gold: Sequence[int], predicted: Sequence[int], num_labels: int) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    labels = list(range(num_labels))
    return {
        "accuracy": float(accuracy_score(gold, predicted)),
        "macro_f1": float(f1_score(gold, predicted, labels=labels, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(gold, predicted)) if len(set(gold)) > 1 or len(set(predicted)) > 1 else 0.0,
    }


def multilabel_metrics(gold: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """gold, predicted: (N, K) 0/1 matrices."""
    from sklearn.metrics import f1_score

    return {
        "micro_f1": float(f1_score(gold, predicted, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(gold, predicted, average="macro", zero_division=0)),
        "subset_accuracy": float((gold == predicted).all(1).mean()),
    }


def regression_metrics(gold: Sequence[float], predicted: Sequence[float]) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    g, p = np.asarray(gold, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    constant = g.std() == 0 or p.std() == 0
    return {"mse": float(((g - p) ** 2).mean()), "pearson": 0.0 if constant else float(pearsonr(g, p)[0]),
            "spearman": 0.0 if constant else float(spearmanr(g, p)[0])}


def relation_micro_f1(gold: Sequence[int], predicted: Sequence[int], negative: int | None) -> dict[str, float]:
    """Micro precision/recall/F1 over the relation classes, the no-relation class excluded
    (predicting no-relation is never a hit; a wrong positive is a false positive)."""
    g, p = np.asarray(gold), np.asarray(predicted)
    positive_pred = p != negative if negative is not None else np.ones_like(p, dtype=bool)
    positive_gold = g != negative if negative is not None else np.ones_like(g, dtype=bool)
    hits = float(((g == p) & positive_pred).sum())
    precision = hits / max(float(positive_pred.sum()), 1.0)
    recall = hits / max(float(positive_gold.sum()), 1.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"micro_f1": f1, "precision": precision, "recall": recall, "accuracy": float((g == p).mean())}


def confusion_png(gold: Sequence[int], predicted: Sequence[int], labels: Sequence[str], path: str | Path,
                  title: str = "confusion matrix") -> Path:
    """Row-normalised confusion matrix with counts, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(gold, predicted, labels=list(range(len(labels))))
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(labels) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("predicted")
    axis.set_ylabel("gold")
    for i in range(len(labels)):
        for j in range(len(labels)):
            axis.text(j, i, str(matrix[i, j]), ha="center", va="center",
                      color="white" if shares[i, j] > 0.5 else "black", fontsize=8)
    axis.set_title(title)
    figure.tight_layout()
    path = Path(path)
    save_figure(figure, path, dpi=120)
    plt.close(figure)
    return path


# ------------------------------------------------------------------ NER
def entity_metrics(gold: list[list[str]], predicted: list[list[str]], scheme: str = "BIO") -> dict[str, float]:
    """Entity-level precision/recall/F1 (seqeval, strict mode), overall and per type."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2, IOBES

    report = classification_report(gold, predicted, mode="strict", scheme=IOBES if scheme == "BIOES" else IOB2,
                                   output_dict=True, zero_division=0)
    metrics = {"entity_precision": float(report["micro avg"]["precision"]),
               "entity_recall": float(report["micro avg"]["recall"]),
               "entity_f1": float(report["micro avg"]["f1-score"])}
    for name, values in report.items():
        if name not in ("micro avg", "macro avg", "weighted avg"):
            metrics[f"{name}_f1"] = float(values["f1-score"])
    return metrics


# ------------------------------------------------------------------ extractive QA
_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")


def normalise_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation) and not _is_cjk_punct(ch))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _is_cjk_punct(ch: str) -> bool:
    return ch in "，。！？、；：“”‘’（）《》【】—…·「」『』"


def answer_tokens(text: str) -> list[str]:
    """Whitespace tokens of the normalised answer; CJK characters count one each."""
    tokens: list[str] = []
    for word in normalise_answer(text).split():
        if _CJK.search(word):
            buffer = ""
            for ch in word:
                if _CJK.match(ch):
                    if buffer:
                        tokens.append(buffer)
                        buffer = ""
                    tokens.append(ch)
                else:
                    buffer += ch
            if buffer:
                tokens.append(buffer)
        else:
            tokens.append(word)
    return tokens


def exact_match(prediction: str, gold: str) -> float:
    return float(normalise_answer(prediction) == normalise_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    predicted, reference = answer_tokens(prediction), answer_tokens(gold)
    if not predicted or not reference:  # SQuAD v2: no-answer matches only no-answer
        return float(predicted == reference)
    common = collections.Counter(predicted) & collections.Counter(reference)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(EM, F1) of one prediction: the max over gold answers ([""] when unanswerable)."""
    golds = [g for g in golds if normalise_answer(g)] or [""]
    return max(exact_match(prediction, g) for g in golds), max(token_f1(prediction, g) for g in golds)


# ------------------------------------------------------------------ ranking
def ranking_metrics(labels: Sequence[float], scores: Sequence[float], groups: Sequence[Any], k: int = 10
                    ) -> dict[str, float]:
    """AUC over all pairs, and NDCG@k averaged over query groups with a positive item."""
    from sklearn.metrics import ndcg_score, roc_auc_score

    y, s = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    metrics = {"auc": float(roc_auc_score(y > 0, s)) if len(set((y > 0).tolist())) == 2 else float("nan")}
    by_group: dict[Any, list[int]] = collections.defaultdict(list)
    for index, group in enumerate(groups):
        by_group[group].append(index)
    ndcgs = []
    for members in by_group.values():
        if len(members) < 2 or not (y[members] > 0).any():
            continue
        ndcgs.append(ndcg_score(y[members][None], s[members][None], k=k))
    metrics[f"ndcg@{k}"] = float(np.mean(ndcgs)) if ndcgs else float("nan")
    metrics["groups"] = float(len(ndcgs))
    return metrics


def retrieval_metrics(ranked: Sequence[Sequence[Any]], relevant: Sequence[Any | set[Any]],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """hit@k (a relevant item among the first k), recall@k (share of the relevant items
    found in the first k), NDCG@k (binary gains, log2 discount) and MRR@max(ks) (1 / rank of
    the first relevant item, 0 past the cut-off), averaged over queries. ``relevant`` holds
    one item or a set of items per query."""
    if len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} rankings for {len(relevant)} queries")
    cut = max(ks)
    sums: dict[str, float] = collections.defaultdict(float)
    for ranking, gold in zip(ranked, relevant, strict=True):
        wanted = gold if isinstance(gold, (set, frozenset)) else {gold}
        hits = [item in wanted for item in list(ranking)[:cut]]
        for k in ks:
            found = sum(hits[:k])
            sums[f"hit@{k}"] += float(found > 0)
            sums[f"recall@{k}"] += found / max(len(wanted), 1)
            dcg = sum(1.0 / np.log2(rank + 2) for rank, hit in enumerate(hits[:k]) if hit)
            ideal = sum(1.0 / np.log2(rank + 2) for rank in range(min(len(wanted), k)))
            sums[f"ndcg@{k}"] += dcg / ideal if ideal else 0.0
        first = next((rank for rank, hit in enumerate(hits) if hit), None)
        sums[f"mrr@{cut}"] += 1.0 / (first + 1) if first is not None else 0.0
    count = max(len(ranked), 1)
    return {name: value / count for name, value in sums.items()}


def coverage(ranked: Sequence[Sequence[Any]], catalogue_size: int) -> float:
    """Share of the catalogue that appears in at least one of the ranked lists."""
    if catalogue_size <= 0:
        raise ValueError("the catalogue is empty")
    return len({item for ranking in ranked for item in ranking}) / catalogue_size


# ------------------------------------------------------------------ generation
def has_cjk(texts: Sequence[str]) -> bool:
    return any(_CJK.search(t) for t in texts)


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU and chrF (sacrebleu; Chinese targets use its zh tokenizer) and ROUGE-L F1
    (rouge-score; CJK characters are split into tokens, which its default tokenizer drops)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    chinese = has_cjk(references)
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize="zh" if chinese else "13a")
    chrf = sacrebleu.corpus_chrf(list(predictions), [list(references)])

    class _Tokenizer:
        def tokenize(self, text: str) -> list[str]:
            return answer_tokens(text)

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return {"bleu": float(bleu.score), "chrf": float(chrf.score), "rougeL": float(np.mean(rouge)) if rouge else 0.0}

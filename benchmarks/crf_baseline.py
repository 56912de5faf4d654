"""A classical CRF tagger (sklearn-crfsuite, L-BFGS with L1 + L2) on word and character
features: the floor that token-classification fine-tuning has to clear, on exactly the split
lmforge fine-tunes on (corpus train / validation / test, or the same files).

    python benchmarks/crf_baseline.py --corpus peoples_daily_ner
    python benchmarks/crf_baseline.py --train train.conll --validation dev.conll --test test.conll

Features of token i: the token, lowercased, its shape (Xx, dd, ...), prefixes and suffixes
up to 3 characters, whether it is a digit, punctuation or a CJK character, and the same
(token, lowercase) for tokens i-2..i+2 with the bigrams around i; for Chinese, where every
token is one character, the window is the character n-gram context. c1 and c2 are chosen
on the validation split; scores are seqeval strict entity F1 (lmforge's own metric).
Prints a table and writes docs/benchmarks/crf-<name>.json.
"""

from __future__ import annotations

import argparse
import time
import unicodedata
from pathlib import Path
from typing import Any

import sklearn_crfsuite
from baseline_report import report

from lmforge.data.corpora import corpus
from lmforge.eval.metrics import entity_metrics


def shape(token: str) -> str:
    out = []
    for char in token[:6]:
        kind = "X" if char.isupper() else "x" if char.islower() else "d" if char.isdigit() else \
            "c" if "CJK" in unicodedata.name(char, "") else char
        if not out or out[-1] != kind:
            out.append(kind)
    return "".join(out)


def token_features(tokens: list[str], i: int) -> dict[str, Any]:
    token = tokens[i]
    features: dict[str, Any] = {"bias": 1.0, "t": token, "lower": token.lower(), "shape": shape(token),
                                "digit": token.isdigit(), "punct": all(unicodedata.category(c).startswith("P")
                                                                       for c in token),
                                "upper": token[:1].isupper(), "len": min(len(token), 6)}
    for k in (1, 2, 3):
        if len(token) > k:
            features[f"pre{k}"], features[f"suf{k}"] = token[:k].lower(), token[-k:].lower()
    for offset in (-2, -1, 1, 2):
        j = i + offset
        features[f"{offset}:lower"] = tokens[j].lower() if 0 <= j < len(tokens) else ("<s>" if j < 0 else "</s>")
    features["bi-1"] = features["-1:lower"] + "|" + features["lower"]
    features["bi+1"] = features["lower"] + "|" + features["1:lower"]
    features["tri"] = features["-1:lower"] + "|" + features["lower"] + "|" + features["1:lower"]
    return features


def sentence_features(tokens: list[str]) -> list[dict[str, Any]]:
    return [token_features(tokens, i) for i in range(len(tokens))]


def read(args: argparse.Namespace) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    if args.corpus:
        return args.corpus, {s: list(corpus(args.corpus).examples(s)) for s in ("train", "validation", "test")}
    from lmforge.tasks.ner import read_conll

    data = {s: list(read_conll(Path(getattr(args, s)))) for s in ("train", "validation", "test")}
    return Path(args.train).stem, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=None)
    parser.add_argument("--train")
    parser.add_argument("--validation")
    parser.add_argument("--test")
    parser.add_argument("--iterations", type=int, default=100)
    args = parser.parse_args()
    if not args.corpus and not (args.train and args.validation and args.test):
        parser.error("give --corpus NAME, or --train, --validation and --test CoNLL files")
    name, data = read(args)
    x = {s: [sentence_features(e["tokens"]) for e in items] for s, items in data.items()}
    y = {s: [list(e["tags"]) for e in items] for s, items in data.items()}
    best = None
    start = time.perf_counter()
    for c1, c2 in ((0.05, 0.01), (0.1, 0.05), (0.2, 0.1)):
        model = sklearn_crfsuite.CRF(algorithm="lbfgs", c1=c1, c2=c2, max_iterations=args.iterations,
                                     all_possible_transitions=True)
        model.fit(x["train"], y["train"])
        score = entity_metrics(y["validation"], model.predict(x["validation"]))["entity_f1"]
        print(f"c1={c1} c2={c2}: validation entity F1 {score:.4f}", flush=True)
        if best is None or score > best[0]:
            best = (score, c1, c2, model)
    assert best is not None
    _, c1, c2, model = best
    metrics = entity_metrics(y["test"], model.predict(x["test"]))
    result = {"data": name, "train_sentences": len(y["train"]), "test_sentences": len(y["test"]), "c1": c1, "c2": c2,
              "iterations": args.iterations, "seconds": round(time.perf_counter() - start, 1), **metrics}
    report(f"crf-{name}", {"data": name, "train sentences": len(y["train"]), "c1": str(c1), "c2": str(c2),
                           "test entity P": metrics["entity_precision"], "test entity R": metrics["entity_recall"],
                           "test entity F1": metrics["entity_f1"]}, result)


if __name__ == "__main__":
    main()

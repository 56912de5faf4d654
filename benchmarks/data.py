"""Data benchmark: tokenization and sharding throughput, and loader cost per training step.

Corpus: People's Daily (Chinese) + Brown (English), real text from installed packages,
repeated to at least --megabytes MB. Compared in one process, one tokenizer file:

  raw       HF `tokenizers` encode_batch on the whole corpus, no output kept (the ceiling)
  lmforge   `prepare_shards` end to end: content hash, worker processes, memmap shards
  per-doc   transformers' fast tokenizer called once per document in a Python loop

Loader: time to produce one packed MLM batch (batch 32 x seq 128) against the time of
one training step (forward + backward + AdamW) of a 4-layer, 256-hidden encoder.

    python benchmarks/data.py [--megabytes 100] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.data.corpora import corpus
from lmforge.data.loader import PackedLoader
from lmforge.data.shards import TokenShards, prepare_shards
from lmforge.models import MaskedLM, preset
from lmforge.tokenizer import train_bpe, train_wordpiece

ROOT = Path(__file__).resolve().parent.parent


def base_documents() -> list[str]:
    return list(corpus("peoples_daily").documents(None)) + list(corpus("brown").documents(None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=100)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    import transformers

    base = base_documents()
    base_bytes = sum(len(d.encode("utf-8")) for d in base)
    repeats = int(np.ceil(args.megabytes * 2**20 / base_bytes))
    documents = base * repeats
    total_mb = base_bytes * repeats / 2**20
    print(f"corpus: {len(documents):,} documents, {total_mb:.1f} MiB ({repeats} x People's Daily + Brown)")
    rows = []
    for kind in ("wordpiece", "bpe"):
        trainer = train_wordpiece if kind == "wordpiece" else train_bpe
        tokenizer = trainer(base, 30_000, show_progress=False)  # type: ignore[operator]
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save(tmp)
            fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(tmp) / "tokenizer.json"))
            start = time.perf_counter()
            for offset in range(0, len(documents), 10_000):
                tokenizer.backend.encode_batch(documents[offset : offset + 10_000], add_special_tokens=False)
            raw = total_mb / (time.perf_counter() - start)
            start = time.perf_counter()
            prepare_shards(lambda: documents, tokenizer, Path(tmp) / "shards", workers=args.workers, progress=False)
            ours = total_mb / (time.perf_counter() - start)
            tokens = len(TokenShards(Path(tmp) / "shards"))
            sample = documents[: max(1, len(documents) // 10)]  # a tenth is enough to time the loop
            sample_mb = sum(len(d.encode("utf-8")) for d in sample) / 2**20
            start = time.perf_counter()
            for document in sample:
                fast(document, add_special_tokens=False)["input_ids"]
            per_doc = sample_mb / (time.perf_counter() - start)
        rows.append({"tokenizer": kind, "MiB": round(total_mb, 1), "tokens": tokens, "raw_encode_batch_MiBps": raw,
                     "lmforge_prepare_MiBps": ours, "transformers_per_document_MiBps": per_doc,
                     "lmforge_share_of_raw": ours / raw, "lmforge_vs_per_document": ours / per_doc})
        print(rows[-1], flush=True)

    # loader cost per training step
    torch.set_num_threads(2)
    tokenizer = train_wordpiece(base, 30_522, show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        prepare_shards(lambda: base, tokenizer, Path(tmp) / "s", workers=args.workers, progress=False)
        shards = TokenShards(Path(tmp) / "s")
        loader = PackedLoader(shards, 128, 32, seed=0, cls_id=tokenizer.token_id("[CLS]"),
                              sep_id=tokenizer.token_id("[SEP]"))
        iterator = iter(loader)
        next(iterator)
        start = time.perf_counter()
        for _ in range(50):
            next(iterator)
        loader_ms = (time.perf_counter() - start) / 50 * 1000
        model = MaskedLM(preset("bert-mini", vocab_size=30_522))  # type: ignore[arg-type]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = next(iterator)["input_ids"]
        times = []
        for step in range(6):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden = model(batch)
                rows_ = hidden[:, ::7].reshape(-1, hidden.shape[-1])  # about 15% of positions, as MLM
                loss = torch.nn.functional.cross_entropy(model.logits(rows_).float(), batch[:, ::7].reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step:
                times.append(time.perf_counter() - start)
        step_ms = float(np.median(times)) * 1000
    loader_row = {"loader_ms_per_batch": loader_ms, "train_step_ms": step_ms, "loader_share": loader_ms / step_ms}
    print(loader_row)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "loader": loader_row, "workers": args.workers, "cpus": os.cpu_count()}
    (args.out / "data.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| tokenizer | corpus | raw `encode_batch` | lmforge `prepare` (end to end) | share of raw | "
             "transformers, per document | lmforge / per document |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['tokenizer']} | {row['MiB']} MiB, {row['tokens']:,} tokens | "
                     f"{row['raw_encode_batch_MiBps']:.2f} MiB/s | {row['lmforge_prepare_MiBps']:.2f} MiB/s | "
                     f"**{row['lmforge_share_of_raw']:.0%}** | {row['transformers_per_document_MiBps']:.2f} MiB/s | "
                     f"**{row['lmforge_vs_per_document']:.2f}x** |")
    lines += ["", f"Loader: {loader_ms:.2f} ms per packed batch (32 x 128) vs {step_ms:.0f} ms per training step of "
              f"a 4-layer/256-hidden MLM model: **{loader_row['loader_share']:.2%}** of a step."]
    (args.out / "data.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

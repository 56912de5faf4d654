"""Training throughput: lmforge against transformers on the same model, data and steps.

Masked LM: BERT 4 layers, hidden 256, 4 heads, FFN 1024, vocab 30,522, seq 128, batch 32.
Causal LM: GPT-2 style, same sizes, vocab 50,257.

Each side runs in its own child process (one script, run one after the other), so each
gets its own peak RSS and, for the tcmalloc rows, its own LD_PRELOAD; the other lmforge row
runs with glibc tuned as the lmforge command leaves it without tcmalloc. lmforge runs with
its defaults (``precision: auto``: bf16 only where this CPU runs it faster than fp32);
transformers runs in fp32, and in bf16 too where the CPU has native bf16 (emulated bf16
takes minutes per step and nobody would pick it). The table states the CPU and its flags. Every side trains
with AdamW on the same token batches (random ids; for MLM the same 15% 80/10/10 masks)
for --warmup + --steps steps; tokens/s counts input tokens over the timed steps. MFU
divides achieved FLOP/s (6 x matmul parameters x tokens; for MLM the vocabulary
projection counted on the masked rows the model actually projects) by the dense matmul
peak measured in the same child, fp32 and bf16.

    python benchmarks/train.py [--steps 8] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmforge.runtime import tcmalloc_path

ROOT = Path(__file__).resolve().parent.parent
BATCH, SEQ, HIDDEN, LAYERS, HEADS, FFN = 32, 128, 256, 4, 4, 1024
TCMALLOC = tcmalloc_path()
# set in the environment, these make torch's own kernels, oneDNN and MKL use no instruction set
# above the one named, so an AVX-512/AMX CPU runs as an AVX2-only one would (fp32 FMA paths,
# bf16 emulated): ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def batches(vocab: int, count: int, mlm: bool) -> list[dict[str, torch.Tensor]]:
    from lmforge.objectives.mlm import MaskingConfig, mask_tokens

    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(1000, vocab, (BATCH, SEQ), generator=generator)
        if mlm:
            ids[:, 0], ids[:, -1] = 101, 102
            inputs, labels = mask_tokens(ids, 103, vocab, [0, 100, 101, 102, 103], MaskingConfig(), generator)
            out.append({"input_ids": inputs, "labels": labels})
        else:
            out.append({"input_ids": ids})
    return out


def peak_rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def run_side(side: str, warmup: int, steps: int) -> dict[str, object]:
    """Train one side; return tokens/s, MFU and peak RSS."""
    import transformers

    from lmforge.hardware import matmul_peak, resolve_precision
    from lmforge.models import Decoder, MaskedLM, preset
    from lmforge.objectives import CausalLMObjective, MaskedLMObjective
    from lmforge.train.optim import build_optimizer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    task, who, precision = side.split(":")[:3]
    if who == "lmforge":  # what the lmforge command does: without tcmalloc, glibc tuned
        from lmforge.runtime import tune_glibc_malloc

        tune_glibc_malloc()
    if precision == "auto":
        precision = resolve_precision("auto", "cpu").name
    mlm = task == "mlm"
    vocab = 30_522 if mlm else 50_257
    data = batches(vocab, warmup + steps, mlm)
    autocast = precision == "bf16"
    if who == "transformers":
        if mlm:
            config = transformers.BertConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                             num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=512)
            model = transformers.BertForMaskedLM(config)
        else:
            config = transformers.GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
                                             n_positions=1024)
            model = transformers.GPT2LMHeadModel(config)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(batch: dict[str, torch.Tensor]) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                labels = batch["labels"] if mlm else batch["input_ids"]
                loss = model(input_ids=batch["input_ids"], labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embeddings" not in n
                     and "wte" not in n and "wpe" not in n)
        head = vocab * HIDDEN
        flops_per_token = 6.0 * (matmul + head)  # transformers projects every position
    else:
        if mlm:
            model = MaskedLM(preset("bert-mini", vocab_size=vocab, add_pooler=False))  # type: ignore[arg-type]
            objective = MaskedLMObjective(model, 103, [0, 100, 101, 102, 103])
        else:
            model = Decoder(preset("gpt2-mini", vocab_size=vocab, intermediate_size=FFN, dropout=0.1))  # type: ignore[arg-type]
            objective = CausalLMObjective(model)
        objective.train()
        optimizer = build_optimizer(objective, 1e-4, 0.01, 0.9, 0.999, 1e-8)

        def step(batch: dict[str, torch.Tensor]) -> None:
            prepared = {**batch, "targets": batch["input_ids"][:, 1:]} if not mlm else batch
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = objective(prepared)
            count = (batch["labels"] != -100).sum() if mlm else batch["input_ids"][:, 1:].numel()
            (sum(out.loss_sums.values()) / count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        flops_per_token = objective.flops_per_token()
        if mlm:  # count the head on the rows actually projected (the same rate for both sides' masks)
            rate = float(sum(int((b["labels"] != -100).sum()) for b in data)) / (len(data) * BATCH * SEQ)
            flops_per_token += 6.0 * (rate - objective.masking.rate) * vocab * HIDDEN
    for batch in data[:warmup]:
        step(batch)
    start = time.perf_counter()
    for batch in data[warmup:]:
        step(batch)
    elapsed = time.perf_counter() - start
    tokens_per_s = steps * BATCH * SEQ / elapsed
    peaks = {name: matmul_peak(dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    return {"side": side, "precision": precision, "tokens_per_s": tokens_per_s, "seconds_per_step": elapsed / steps,
            "mfu_vs_fp32_peak": tokens_per_s * flops_per_token / peaks["fp32"],
            "mfu_vs_bf16_peak": tokens_per_s * flops_per_token / peaks["bf16"],
            "peak_gflops": {k: v / 1e9 for k, v in peaks.items()}, "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_side(args.child, args.warmup, args.steps)))
        return
    from lmforge.hardware import describe_machine, resolve_precision

    native_bf16 = resolve_precision("auto", "cpu").name == "bf16"
    sides = []
    for task in ("mlm", "clm"):
        sides += [f"{task}:transformers:fp32", *([f"{task}:transformers:bf16"] if native_bf16 else []),
                  f"{task}:lmforge:auto", *([f"{task}:lmforge:auto:tcmalloc"] if TCMALLOC else [])]
    results = {}
    for side in sides:
        env = dict(os.environ)
        if side.endswith("tcmalloc"):
            env["LD_PRELOAD"] = TCMALLOC  # type: ignore[assignment]
        out = subprocess.run([sys.executable, __file__, "--child", side, "--steps", str(args.steps), "--warmup",
                              str(args.warmup)], capture_output=True, text=True, env=env, check=True)
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
        print(results[side], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = describe_machine()
    capped = {name: os.environ[name] for name in ISA_CAPS if name in os.environ}
    machine["isa_caps"] = capped
    lines = [f"CPU: {machine['cpu']}, flags: {machine['cpu_flags']}; {machine['threads']} threads; torch "
             f"{machine['torch']}. lmforge precision (auto) chose: "
             f"{next(r['precision'] for s, r in results.items() if ':lmforge:' in s)}."
             + (" Instruction sets capped for every library (an older CPU emulated): "
                + ", ".join(f"{k}={v}" for k, v in capped.items()) + "." if capped else ""), "",
             "| task | side | precision | tokens/s | vs transformers fp32 | vs transformers bf16 | MFU (fp32 peak) "
             "| MFU (bf16 peak) | peak RSS MiB | RSS vs transformers fp32 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for side, row in results.items():
        task = side.split(":")[0]
        base32, base16 = results[f"{task}:transformers:fp32"], results.get(f"{task}:transformers:bf16")
        versus16 = f"{row['tokens_per_s'] / base16['tokens_per_s']:.2f}x" if base16 else "not run (no native bf16)"
        lines.append(f"| {task} | {side.split(':', 1)[1]} | {row['precision']} | {row['tokens_per_s']:,.0f} | "
                     f"**{row['tokens_per_s'] / base32['tokens_per_s']:.2f}x** | "
                     f"{versus16} | {row['mfu_vs_fp32_peak']:.1%} | "
                     f"{row['mfu_vs_bf16_peak']:.1%} | {row['peak_rss_mib']:.0f} | "
                     f"{row['peak_rss_mib'] / base32['peak_rss_mib']:.2f}x |")
    peak = next(iter(results.values()))["peak_gflops"]
    lines.append(f"\nMatmul peaks measured in the same runs: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s "
                 f"(2 threads).")
    (args.out / "train.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    (args.out / "train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

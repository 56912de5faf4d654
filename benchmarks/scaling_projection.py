"""A projection on paper: BERT-base masked LM and SmolLM2-135M continued pretraining on 8 GPUs,
from one GPU's measured throughput.

One GPU's tokens/s and peak memory are measured by ``make gpu-check`` (docs/gpu-check.md:
an H200, torch 2.11, bf16 autocast, AdamW, BERT-base at 64 x 512 and SmolLM2-135M at
16 x 2048 a GPU). From them:

- MFU = measured tokens/s x FLOPs per token / the bf16 peak measured on the same GPU, with
  FLOPs per token from lmforge's own modules (``Objective.flops_per_token``: 6 x the matmul
  parameters a token goes through, the MLM vocabulary projection on masked rows only);
- an A100 is projected at the same MFU on its 312 TFLOP/s (an H100 SXM has the H200's compute
  and less memory bandwidth: at most the H200's rate);
- 8 GPUs run at a *stated* 90% scaling efficiency (DDP's gradient all-reduce, 0.4-0.5 GB
  a step in fp32, overlapped with the backward pass over NVLink: not measured: one GPU was available);
- memory per GPU: the measured one-GPU peak under DDP (plus its 4-byte-a-parameter gradient
  buckets); under FSDP2, less 7/8 of the 16 bytes a parameter of fp32 weights, gradients and
  AdamW moments.

    python benchmarks/scaling_projection.py > docs/scaling-projection.md
"""

from __future__ import annotations

import torch

from lmforge.models import Decoder, MaskedLM, preset
from lmforge.objectives import CausalLMObjective, MaskedLMObjective

GPUS = 8
EFFICIENCY = 0.90  # stated: 8-GPU DDP/FSDP2 throughput over 8 x one GPU's
MEASURED_PEAK = 796e12  # bf16 dense matmul FLOP/s measured on the H200 (docs/gpu-check.md)
# one H200, docs/gpu-check.md: tokens/s, peak GiB, micro-batch (rows x length)
MEASURED = {"bert": (398_193, 15.2, (64, 512)), "smollm2": (163_366, 26.3, (16, 2048))}
PEAKS = {"H200 (measured one-GPU rate)": None, "A100 (bf16 dense 312 TFLOP/s, same MFU)": 312e12}
JOBS = {
    # name: (model, tokens to train on)
    "BERT-base MLM (BERT's budget: 1M steps x 256 x 512 = 131B tokens)": ("bert", 131e9),
    "SmolLM2-135M continued pretraining (10B tokens)": ("smollm2", 10e9),
}


def build(kind: str) -> torch.nn.Module:
    with torch.device("meta"):
        if kind == "bert":
            return MaskedLMObjective(MaskedLM(preset("bert-base", vocab_size=30522)), 103, [0, 100, 101, 102, 103])  # type: ignore[arg-type]
        return CausalLMObjective(Decoder(preset("smollm2-135m")))  # type: ignore[arg-type]


def main() -> None:
    lines = ["| job | GPU | micro-batch a GPU | MFU | tokens/s (8 GPUs) | wall time | params | memory/GPU DDP | "
             "memory/GPU FSDP2 |", "|---|---|---|---|---|---|---|---|---|"]
    for job, (kind, tokens) in JOBS.items():
        objective = build(kind)
        params = sum(p.numel() for p in objective.parameters())
        flops = objective.flops_per_token()  # type: ignore[operator]
        one_gpu, peak_gib, (rows, length) = MEASURED[kind]
        mfu = one_gpu * flops / MEASURED_PEAK
        ddp = peak_gib + 4 * params / 2**30
        fsdp = ddp - 16 * params * (GPUS - 1) / GPUS / 2**30
        for gpu, peak in PEAKS.items():
            rate = GPUS * EFFICIENCY * (one_gpu if peak is None else peak * mfu / flops)
            seconds = tokens / rate
            wall = f"{seconds / 86400:.2f} days" if seconds > 86400 else f"{seconds / 3600:.1f} h"
            lines.append(f"| {job} | {gpu} | {rows} x {length} | {mfu:.1%} | {rate / 1e6:.2f} M | {wall} | "
                         f"{params / 1e6:.0f} M | {ddp:.1f} GiB | {fsdp:.1f} GiB |")
    print(f"{GPUS} GPUs at a stated {EFFICIENCY:.0%} scaling efficiency; one GPU's rate, memory and MFU measured on an "
          "H200 (docs/gpu-check.md).\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""A projection on paper: BERT-base masked LM and SmolLM2-135M continued pretraining on 8 GPUs.

FLOPs per token are counted from lmforge's own modules (``Objective.flops_per_token``:
6 x the matmul parameters a token goes through, the MLM vocabulary projection on masked
rows only) plus attention scores (12 x layers x seq x hidden per token, forward and
backward). Throughput = GPUs x peak x MFU / FLOPs per token, at a *stated* MFU (it was not
measured on a GPU: no GPU machine was lent when this was written; `make gpu-check` measures
it). Memory per GPU: weights, gradients and AdamW moments in fp32 (16 bytes a parameter),
whole on every GPU under DDP, divided by the GPU count under FSDP2, plus activations of
one micro-batch in bf16 with SDPA (no seq^2 term) and no activation checkpointing:
about 34 x seq x batch x hidden bytes a layer (Korthikanti et al. 2022).

    python benchmarks/scaling_projection.py > docs/scaling-projection.md
"""

from __future__ import annotations

import torch

from lmforge.models import Decoder, MaskedLM, preset
from lmforge.objectives import CausalLMObjective, MaskedLMObjective

GPUS = 8
MFU = 0.40  # stated, not measured
PEAKS = {"A100 (bf16 dense 312 TFLOP/s)": 312e12, "H100 SXM (bf16 dense 989 TFLOP/s)": 989e12}
JOBS = {
    # name: (model builder, tokens to train on, sequence length, micro-batch per GPU)
    "BERT-base MLM (BERT's budget: 1M steps x 256 x 512 = 131B tokens)": ("bert", 131e9, 512, 32),
    "SmolLM2-135M continued pretraining (10B tokens)": ("smollm2", 10e9, 2048, 8),
}


def build(kind: str) -> tuple[torch.nn.Module, int, int]:
    with torch.device("meta"):
        if kind == "bert":
            config = preset("bert-base", vocab_size=30522)
            objective = MaskedLMObjective(MaskedLM(config), 103, [0, 100, 101, 102, 103])  # type: ignore[arg-type]
        else:
            config = preset("smollm2-135m")
            objective = CausalLMObjective(Decoder(config))  # type: ignore[arg-type]
    return objective, config.num_layers, config.hidden_size


def main() -> None:
    lines = ["| job | GPU | FLOPs/token | tokens/s (8 GPUs) | wall time | params | memory/GPU DDP | memory/GPU FSDP2 |",
             "|---|---|---|---|---|---|---|---|"]
    for job, (kind, tokens, seq, micro) in JOBS.items():
        objective, layers, hidden = build(kind)
        params = sum(p.numel() for p in objective.parameters())
        flops = objective.flops_per_token() + 12 * layers * seq * hidden
        states = 16 * params
        activations = 34 * seq * micro * hidden * layers
        for gpu, peak in PEAKS.items():
            rate = GPUS * peak * MFU / flops
            seconds = tokens / rate
            wall = f"{seconds / 86400:.2f} days" if seconds > 86400 else f"{seconds / 3600:.1f} h"
            lines.append(f"| {job} | {gpu} | {flops / 1e9:.2f} G | {rate / 1e6:.2f} M | {wall} | {params / 1e6:.0f} M "
                         f"| {(states + activations) / 2**30:.1f} GiB | {(states / GPUS + activations) / 2**30:.1f} GiB |")
    print(f"MFU {MFU:.0%} (stated), {GPUS} GPUs, micro-batch per GPU: BERT 32 x 512, SmolLM2 8 x 2048.\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

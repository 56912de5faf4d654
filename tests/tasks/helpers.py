"""Run a fine-tuning job on the tiny fixtures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.recipes.finetune import load_config, run_finetuning


def finetune(model: Path, output: Path, *flags: str, **options: Any) -> dict[str, Any]:
    arguments = ["--model", str(model), "--train.lr", "2e-3", "--train.batch_size", "16", "--train.warmup_steps", "0",
                 "--train.precision", "fp32", *flags]  # the caller's flags win
    for key, value in options.items():
        arguments += [f"--{key.replace('_', '-')}", str(value)]
    return run_finetuning(load_config(None, arguments), output, progress=False)

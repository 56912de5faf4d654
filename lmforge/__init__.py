"""lmforge: pretrain, fine-tune, transfer, compress and serve Transformer language models.

    import lmforge
    model, tokenizer = lmforge.load_pretrained("path/to/model-or.gguf")
    print(lmforge.generate(model, tokenizer, "The capital of France is"))
    results = lmforge.finetune("classify", "runs/bert/model", "train.jsonl", "runs/cls", validation="dev.jsonl")

Everything a user needs is importable from ``lmforge``; the modules behind it may move.
The recipes (``pretrain``, ``finetune``, ``evaluate``, ``predict``) load on first use, so
``import lmforge`` stays light and the library never imports a recipe.
"""

from __future__ import annotations

from typing import Any

from lmforge.checkpoint import load_model, load_pretrained, save_model
from lmforge.errors import (
    ConfigError,
    CorruptFileError,
    DataError,
    DiskFullError,
    LmforgeError,
    TokenizerError,
    UnknownArchitectureError,
    WeightsError,
)
from lmforge.generation import GenerationConfig, generate
from lmforge.hardware import resolve_device, resolve_precision
from lmforge.interop.hf import save_hf
from lmforge.peft import AdapterBank, PeftSection, apply_peft, load_adapter, merge, save_adapter, unmerge
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig, Trainer

__version__ = "0.1.0"

_RECIPES = {"pretrain": ("lmforge.recipes.pretrain", "pretrain"),
            "finetune": ("lmforge.recipes.finetune", "finetune"),
            "evaluate": ("lmforge.recipes.finetune", "evaluate_model"),
            "predict": ("lmforge.recipes.finetune", "predict_file")}


def __getattr__(name: str) -> Any:
    if name in _RECIPES:
        import importlib

        module, attribute = _RECIPES[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")


__all__ = [
    "AdapterBank",
    "ConfigError",
    "CorruptFileError",
    "DataError",
    "DiskFullError",
    "GenerationConfig",
    "LmforgeError",
    "PeftSection",
    "Tokenizer",
    "TokenizerError",
    "TrainConfig",
    "Trainer",
    "UnknownArchitectureError",
    "WeightsError",
    "__version__",
    "apply_peft",
    "evaluate",
    "finetune",
    "generate",
    "load_adapter",
    "load_model",
    "load_pretrained",
    "merge",
    "predict",
    "pretrain",
    "resolve_device",
    "resolve_precision",
    "save_adapter",
    "save_hf",
    "save_model",
    "unmerge",
]

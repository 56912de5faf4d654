"""The models a server holds: fine-tuned task models, encoders for embeddings, decoders for
chat and completions. Each is loaded once, laid out for inference once, and warmed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError


@dataclass
class Served:
    name: str
    kind: str  # "task", "embedding" or "generate"
    max_tokens: int  # positions the model holds
    model: Any = None  # backbone (embedding), decoder (generate)
    tokenizer: Any = None
    task: Any = None
    objective: Any = None
    generator: Any = None

    @property
    def route(self) -> str:
        """The API route family this model answers."""
        if self.kind == "task":
            return {"classify": "classify", "relation": "classify", "ner": "ner", "qa": "qa",
                    "pair-score": "classify"}.get(self.task.name, self.task.name)
        return "embeddings" if self.kind == "embedding" else "chat"

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    # ------------------------------------------------------------------ batched calls
    def run_task(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Predictions for unlabeled records (one batch through the task's own decoding)."""
        examples = [self.task.from_request(record, f"request input {i}") for i, record in enumerate(records)]
        features = self.task.encode_all(examples, labeled=False)
        _, predictions = self.task.evaluate(self.objective, examples, features, batch_size=max(1, len(features)),
                                            labeled=False)
        return [{k: _finite(v) for k, v in p.items() if not k.startswith("_")} for p in predictions]

    @torch.inference_mode()
    def run_embeddings(self, texts: list[str]) -> list[list[float]]:
        """Mean-pooled, L2-normalised last hidden states (the sentence-transformers recipe)."""
        encoded = [self.tokenizer.encode(t)[: self.max_tokens] for t in texts]
        width = max(len(e) for e in encoded)
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(encoded):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        hidden = self.model.hidden_states({"input_ids": ids, "attention_mask": mask})
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return F.normalize(pooled.float(), dim=-1).tolist()  # type: ignore[no-any-return]


def _finite(value: Any) -> Any:
    """JSON has no infinities: a score that does not exist (-inf) is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def parse_spec(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (the name is then the folder or file name)."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name, path
    path = Path(spec)
    name = path.name if path.name != "model" else path.parent.name
    return name.removesuffix(".gguf"), spec


def load_served(spec: str) -> Served:
    from lmforge.deploy import task_folder

    name, path = parse_spec(spec)
    folder = Path(path)
    found = task_folder(folder) if folder.is_dir() else None
    if found is not None:
        from lmforge.tasks.loading import load_task_model

        task, objective = load_task_model(found, device="cpu")
        if task.name == "generate":
            model = objective.model
            return _generator(name, model, task.tokenizer)
        limit = int(task.options.get("max_length") or 512)
        return Served(name, "task", limit, objective.model, task.tokenizer, task, objective.eval())
    from lmforge.checkpoint import load_pretrained

    model, tokenizer = load_pretrained(folder)
    if tokenizer is None:
        raise ConfigError([f"{path}: no tokenizer beside the weights; a served model needs one"])
    if getattr(model, "causal", False):
        return _generator(name, model, tokenizer)
    backbone = getattr(model, "backbone", model)
    return Served(name, "embedding", backbone.config.max_position_embeddings, backbone.eval(), tokenizer)


def _generator(name: str, model: Any, tokenizer: Any) -> Served:
    from lmforge.models.layers import few_rows_layout
    from lmforge.serve.engine import Generator

    model.eval()
    # once, at load: a server decodes several rows per step, and which fp32 layout streams them
    # fastest depends on the CPU, so a short probe decides (decode_linear, few_rows_layout)
    column_major = None
    if model.embed_tokens.weight.dtype == torch.float32:
        column_major = not few_rows_layout(model.config.hidden_size, model.config.intermediate_size)
    model.use_decoding_layout(column_major)
    return Served(name, "generate", model.config.max_position_embeddings, model, tokenizer,
                  generator=Generator(model, tokenizer))


def warm(served: Served) -> None:
    """One small call, so the first request does not pay for lazy initialisation."""
    from lmforge.generation import GenerationConfig

    if served.kind == "task":
        sample: dict[str, Any] = {"id": "warm", "text": "warm up", "question": "warm?", "context": "warm up text",
                                  "text_pair": None}
        if served.task.name == "relation":
            return  # needs entity spans; nothing to guess
        served.run_task([sample])
    elif served.kind == "embedding":
        served.run_embeddings(["warm up"])
    else:
        ids = served.generator.prompt_ids("Hello")
        for _ in served.generator.stream(ids, GenerationConfig(max_new_tokens=2)):
            pass

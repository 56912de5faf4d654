"""Fine-tuned task models read back from their folders (backbone + head + task.json)."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.errors import CorruptFileError
from lmforge.fileio import load_tensors, read_json
from lmforge.hardware import resolve_device
from lmforge.objectives.base import Objective
from lmforge.tasks import Task, TaskSpec, make_task


def load_task_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[Task, Objective]:
    """A fine-tuned model (its folder, or a run folder holding model/) ready to evaluate on ``device``."""
    from lmforge.checkpoint import load_model, load_tokenizer

    folder = Path(folder)
    if not (folder / "task.json").exists() and (folder / "model" / "task.json").exists():
        folder = folder / "model"
    if not (folder / "task.json").exists():
        from lmforge.fewshot import fewshot_folder

        if fewshot_folder(folder) is not None:
            raise CorruptFileError(f"{folder}: an in-context or cloze-prompt classifier (fewshot.json / prompt.json): "
                                   "`lmforge evaluate` and `lmforge predict` take it; this command needs a "
                                   "fine-tuned model folder (e.g. `--method setfit` or `finetune`)")
        raise CorruptFileError(f"{folder}: not a fine-tuned model folder (no task.json); fine-tune one with "
                               "`lmforge finetune`")
    spec = TaskSpec(**read_json(folder / "task.json"))
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise CorruptFileError(f"{folder}: tokenizer files are missing")
    task = make_task(spec, tokenizer)
    if (folder / "model.onnx").exists():  # an ONNX export: scores from onnxruntime, on the CPU
        from lmforge.deploy.onnx import OnnxObjective

        return task, OnnxObjective(task, folder).eval()
    objective = task.objective(load_model(folder))
    head = getattr(objective, "head", None)
    if head is not None:
        from lmforge.weights import load_into

        load_into(head, load_tensors(folder / "head.safetensors"), str(folder / "head.safetensors"))
    return task, objective.to(resolve_device(device)).eval()

"""ONNX export of task models and backbones, run back through onnxruntime.

A task model exports as one graph from token ids to the task's scores (the backbone and
its head together: class logits, per-token tag logits, QA start/end logits), with dynamic
batch and sequence axes. A bare encoder exports its hidden states, a decoder its logits.
The export folder is an ordinary model folder: ``model.onnx``, ``config.json`` (with an
``onnx`` record: inputs, outputs, the parity measured at export), the tokenizer and, for a
task model, ``task.json``; ``evaluate`` and ``predict`` run it through ``OnnxObjective``.
``onnx-int8`` quantises that graph's MatMul weights with onnxruntime's dynamic quantiser.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.errors import ConfigError, CorruptFileError
from lmforge.fileio import read_json
from lmforge.tasks.base import TaskObjective

OPSET = 18
PARITY_TOLERANCE = 1e-4


class _Graph(nn.Module):
    """What is traced: named tensors in, one tensor out."""

    def __init__(self, inner: nn.Module, names: list[str], task: bool) -> None:
        super().__init__()
        self.inner, self.names, self.task = inner, names, task

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                e1: torch.Tensor | None = None, e2: torch.Tensor | None = None) -> torch.Tensor:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                 "e1": e1, "e2": e2}
        batch = {name: given[name] for name in self.names}
        if self.task:
            return self.inner(batch, scores_only=True)  # type: ignore[no-any-return]
        if getattr(self.inner, "causal", False):
            return self.inner.logits(self.inner(batch["input_ids"], batch["attention_mask"]))  # type: ignore[operator,no-any-return]
        return self.inner.hidden_states(batch) if hasattr(self.inner, "hidden_states") else self.inner(**batch)  # type: ignore[operator,no-any-return]


def input_names(model: nn.Module, task_name: str | None) -> list[str]:
    names = ["input_ids", "attention_mask"]
    if not getattr(model, "causal", False):
        names.append("token_type_ids")
    if task_name == "relation":
        names += ["e1", "e2"]
    return names


def sample_inputs(names: list[str], vocab_size: int, batch: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    """Inputs to trace and check with: real-looking ids, one row right-padded."""
    generator = torch.Generator().manual_seed(0)
    sample = {"input_ids": torch.randint(min(5, vocab_size - 1), vocab_size, (batch, length), generator=generator)}
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length * 2 // 3:] = 0
    sample["attention_mask"] = mask
    if "token_type_ids" in names:
        sample["token_type_ids"] = torch.zeros(batch, length, dtype=torch.long)
    if "e1" in names:
        sample["e1"] = torch.ones(batch, dtype=torch.long)
        sample["e2"] = torch.full((batch,), 3, dtype=torch.long)
    return {name: sample[name] for name in names}


def export_graph(inner: nn.Module, backbone: nn.Module, task_name: str | None, path: Path) -> dict[str, Any]:
    """Write ``path`` (model.onnx) and return the record kept in config.json."""
    from lmforge.deploy.quantize import is_quantized

    if is_quantized(backbone):
        raise ConfigError([f"{path.parent}: ONNX export takes the fp32 model; quantise the ONNX graph instead "
                           "(lmforge quantize --method onnx-int8)"])
    if getattr(backbone, "prompt", None) is not None or any(
            getattr(backbone.attention(i), "prefix", None) is not None for i in range(backbone.config.num_layers)):  # type: ignore[operator,union-attr]
        raise ConfigError(["ONNX export does not hold prompt or prefix tuning (their soft tokens change the "
                           "sequence length); merge-able methods (LoRA, IA3) export after merging"])
    names = input_names(backbone, task_name)
    graph = _Graph(inner, names, task=task_name is not None).eval()
    sample = sample_inputs(names, backbone.config.vocab_size)  # type: ignore[union-attr]
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {name: {0: batch} if name in ("e1", "e2") else {0: batch, 1: sequence} for name in names}
    output = "scores" if task_name else ("logits" if getattr(backbone, "causal", False) else "hidden_states")
    with warnings.catch_warnings(), _quiet_exporter(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (), kwargs=sample, dynamo=True, input_names=names,
                                    output_names=[output], dynamic_shapes=shapes, opset_version=OPSET,
                                    verbose=False)
        program.save(str(path))
    return {"inputs": names, "output": output, "opset": OPSET}


class _quiet_exporter:
    """The exporter logs every pass at INFO; keep a user's terminal to our own lines."""

    def __enter__(self) -> None:
        self.levels = {}
        for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript"):
            logger = logging.getLogger(name)
            self.levels[name] = logger.level
            logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)


def session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(graph: Any, names: list[str], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    feeds = {name: batch[name].cpu().numpy().astype(np.int64) for name in names if name in batch}
    if "token_type_ids" in names and "token_type_ids" not in feeds:
        feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    if "attention_mask" not in feeds:
        feeds["attention_mask"] = np.ones_like(feeds["input_ids"])
    return torch.from_numpy(graph.run(None, feeds)[0])


def check_parity(inner: nn.Module, graph: Any, names: list[str], vocab_size: int) -> float:
    """Largest |onnxruntime - torch| on a fresh batch of another shape than the traced one
    (padding positions of per-token outputs left out)."""
    sample = sample_inputs(names, vocab_size, batch=3, length=21)
    with torch.no_grad():
        expected = inner(sample, scores_only=True) if isinstance(inner, TaskObjective) else _Graph(
            inner, names, task=False)(**sample)
    found = run_session(graph, names, sample)
    if found.shape != expected.shape:
        raise CorruptFileError(f"ONNX output shape {tuple(found.shape)} differs from torch's {tuple(expected.shape)}")
    difference = (found - expected.float()).abs()
    if difference.dim() >= 2 and difference.shape[:2] == sample["attention_mask"].shape:
        difference = difference[sample["attention_mask"].bool()]
    return float(difference.max())


def quantize_onnx(source: Path, target: Path) -> None:
    """Dynamic int8 (per-channel weights, uint8 activations) of every MatMul in the graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"MatMulConstBOnly": True})


class OnnxObjective(TaskObjective):
    """A task model whose scores come from an ONNX graph through onnxruntime (CPU)."""

    def __init__(self, task: Any, folder: Path) -> None:
        super().__init__(task, None, None)  # type: ignore[arg-type]
        record = read_json(folder / "config.json").get("onnx")
        if not record:
            raise CorruptFileError(f"{folder / 'config.json'}: no onnx record (export it with `lmforge export --format onnx`)")
        self.names = list(record["inputs"])
        self.graph = session(folder / "model.onnx")
        if task.options.get("crf"):  # a CRF tagger: its transitions were exported beside the graph
            from lmforge.tasks.crf import CRF

            task.crf = CRF.load(task.spec.labels, str(task.options["scheme"]), folder / "crf.safetensors")

    def forward(self, batch: dict[str, torch.Tensor], scores_only: bool = False) -> Any:  # type: ignore[override]
        if not scores_only:
            raise ConfigError(["an ONNX model is for evaluation and prediction; train the torch model instead"])
        return run_session(self.graph, self.names, batch)


def copy_beside(source: Path, target: Path, names: tuple[str, ...]) -> None:
    """Copy the named files (tokenizer, task spec) that exist in ``source`` into ``target``."""
    for name in names:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)

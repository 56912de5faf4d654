"""From a trained model to a deployable one: quantise, prune, distil, export.

Every operation reads a model the way ``evaluate`` does (a fine-tuned run or its model
folder, an lmforge/Hugging Face folder, a GGUF file), checks the whole request before it
writes anything, and writes its output folder atomically: a refused or failed request
leaves no half-written folder behind.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.errors import ConfigError, CorruptFileError
from lmforge.fileio import atomic_directory, read_json, save_tensors, write_json
from lmforge.tokenizer import Tokenizer

TASK_FILES = ("task.json",)


@dataclass
class Source:
    """A model as read for deployment: a task model (backbone + head + task) or a bare model."""

    folder: Path
    model: nn.Module  # the backbone (or the whole bare model)
    tokenizer: Tokenizer | None
    task: Any = None
    head: nn.Module | None = None
    objective: Any = None

    @property
    def is_task(self) -> bool:
        return self.task is not None


def task_folder(path: Path) -> Path | None:
    """The model folder of a fine-tuned run (RUN or RUN/model), or None."""
    if (path / "task.json").exists():
        return path
    if (path / "model" / "task.json").exists():
        return path / "model"
    return None


def open_source(path: str | Path) -> Source:
    """Read a model for deployment, whatever it is."""
    path = Path(path)
    folder = task_folder(path) if path.is_dir() else None
    if folder is not None:
        if (folder / "model.onnx").exists():
            raise ConfigError([f"{folder}: an ONNX export; quantise or export the lmforge model it came from"])
        from lmforge.tasks.loading import load_task_model

        task, objective = load_task_model(folder, device="cpu")
        return Source(folder, objective.model, task.tokenizer, task, objective.head, objective)
    from lmforge.checkpoint import load_pretrained

    model, tokenizer = load_pretrained(path)
    return Source(path, model, tokenizer)


def _refuse_existing(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise ConfigError([f"{output}: already exists; choose another --output or pass --overwrite"])


def write_like(source: Source, model: nn.Module, output: Path, extra: dict[str, Any] | None = None,
               head: nn.Module | None = None, task_spec: dict[str, Any] | None = None) -> Path:
    """An lmforge model folder for ``model`` beside the source's tokenizer and task files."""
    from lmforge.checkpoint import write_model_files

    with atomic_directory(output) as tmp:
        write_model_files(model, tmp, source.tokenizer, extra)
        if source.is_task:
            write_json(tmp / "task.json", task_spec or source.task.spec.to_dict())
            chosen = head if head is not None else source.head
            if chosen is not None:
                save_tensors(dict(chosen.state_dict()), tmp / "head.safetensors")
            for name in ("results.json",):
                if (source.folder / name).is_file():
                    shutil.copy2(source.folder / name, tmp / f"source-{name}")
    return output


def quantize_folder(model: str | Path, method: str, output: str | Path, group_size: int = 32,
             overwrite: bool = False) -> dict[str, Any]:
    """Quantise ``model`` into ``output`` (see ``lmforge.deploy.quantize``); returns a summary."""
    from lmforge.deploy.quantize import METHODS, folder_megabytes, is_quantized, quantize_model

    output = Path(output)
    if method not in (*METHODS, "onnx-int8"):
        raise ConfigError([f"method={method!r}: must be one of {', '.join(METHODS)}, onnx-int8"])
    _refuse_existing(output, overwrite)
    source = open_source(model)
    if is_quantized(source.model):
        raise ConfigError([f"{model}: this model is already quantised ({source.model.quantization['method']}); "  # type: ignore[index]
                           "quantise the original fp32 model instead"])
    if method == "onnx-int8":
        return export_model(model, "onnx", output, overwrite=overwrite, int8=True)
    spec = quantize_model(source.model, method, group_size)
    source.model.quantization = spec
    write_like(source, source.model, output)
    return {"method": method, "output": str(output), "megabytes": round(folder_megabytes(output), 2),
            "source_megabytes": round(folder_megabytes(source.folder), 2)}


def export_model(model: str | Path, format: str, output: str | Path, overwrite: bool = False, int8: bool = False,
           gguf_type: str = "f16") -> dict[str, Any]:
    """Export ``model`` as a Hugging Face folder, an ONNX folder or a GGUF file."""
    output = Path(output)
    if format not in ("hf", "onnx", "gguf"):
        raise ConfigError([f"format={format!r}: must be hf, onnx or gguf"])
    _refuse_existing(output, overwrite)
    source = open_source(model)
    _merge_adapters(source.model, format)
    if format == "gguf":
        from lmforge.interop.gguf import save_gguf

        if source.is_task:
            raise ConfigError(["GGUF holds language models, not task heads; export a decoder (or its LoRA run)"])
        save_gguf(source.model, source.tokenizer, output, gguf_type)
        return {"format": "gguf", "output": str(output), "tensor_type": gguf_type}
    if format == "hf":
        return _export_hf(source, output)
    return _export_onnx(source, output, int8)


def _merge_adapters(model: nn.Module, format: str) -> None:
    """Fold LoRA/IA3 into the weights; other adapters cannot be folded and are refused."""
    peft = getattr(model, "peft_config", None)
    if not peft:
        return
    from lmforge.peft import merge

    if peft.get("method") not in ("lora", "ia3", "bitfit"):
        raise ConfigError([f"{format} export folds LoRA and IA3 into the weights; a {peft.get('method')} model "
                           "keeps extra modules that the format cannot hold"])
    merge(model)


def _export_hf(source: Source, output: Path) -> dict[str, Any]:
    from lmforge.deploy.quantize import is_quantized

    if is_quantized(source.model):
        raise ConfigError(["Hugging Face export takes the fp32 model, not a quantised one"])
    if source.is_task:
        from lmforge.deploy.hf_heads import save_hf_task

        assert source.head is not None and source.tokenizer is not None
        save_hf_task(source.task, source.model, source.head, output, source.tokenizer)
    else:
        from lmforge.interop.hf import save_hf

        state_model = _without_adapter_keys(source.model)
        save_hf(state_model, output, source.tokenizer)
    return {"format": "hf", "output": str(output)}


def _without_adapter_keys(model: nn.Module) -> nn.Module:
    if not getattr(model, "peft_config", None):
        return model
    from lmforge.checkpoint import MODEL_CLASSES

    clean = MODEL_CLASSES[type(model).__name__](model.config)  # type: ignore[operator]
    state = {k: v for k, v in model.state_dict().items() if "lora_" not in k and "ia3_" not in k}
    clean.load_state_dict(state)
    return clean.eval()


def _export_onnx(source: Source, output: Path, int8: bool) -> dict[str, Any]:
    from lmforge.deploy.onnx import check_parity, export_graph, quantize_onnx, session
    from lmforge.fileio import atomic_directory

    inner = source.objective if source.is_task else source.model
    task_name = source.task.name if source.is_task else None
    with atomic_directory(output) as tmp:
        record = export_graph(inner, source.model, task_name, tmp / "model.onnx")
        record["parity_max_abs"] = check_parity(inner, session(tmp / "model.onnx"), record["inputs"],
                                                source.model.config.vocab_size)  # type: ignore[union-attr]
        if record["parity_max_abs"] > 1e-3:
            raise CorruptFileError(f"ONNX export differs from the torch model by {record['parity_max_abs']:.2e}")
        if int8:
            quantize_onnx(tmp / "model.onnx", tmp / "model.int8.onnx")
            (tmp / "model.onnx").unlink()
            (tmp / "model.int8.onnx").rename(tmp / "model.onnx")
            record["quantization"] = "onnxruntime dynamic int8 (per-channel weights)"
            record["parity_max_abs_fp32"] = record.pop("parity_max_abs")
        meta = read_json(source.folder / "config.json") if (source.folder / "config.json").is_file() else {}
        write_json(tmp / "config.json", {**{k: v for k, v in meta.items() if k in ("lmforge_version", "kind", "model")},
                                         "onnx": record})
        if source.tokenizer is not None:
            source.tokenizer.save(tmp)
        if source.is_task:
            write_json(tmp / "task.json", source.task.spec.to_dict())
    return {"format": "onnx", "output": str(output), **record}

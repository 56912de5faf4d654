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
            crf = getattr(source.task, "crf", None)
            if crf is not None:  # the graph gives emissions; the CRF's transitions decode them beside it
                crf.save(tmp / "crf.safetensors")
    return {"format": "onnx", "output": str(output), **record}


def prune_folder(model: str | Path, output: str | Path, data: list[str], heads: float = 0.0, ffn: float = 0.0,
                 recover_steps: int = 0, recover_lr: float = 5e-5, sparsity: float = 0.5,
                 eval_data: list[str] | None = None, batch_size: int = 16, overwrite: bool = False,
                 progress: bool = False) -> dict[str, Any]:
    """Structured pruning of a fine-tuned encoder (``heads``/``ffn`` fractions, ranked on
    ``data``, then ``recover_steps`` of fine-tuning), or Wanda ``sparsity`` for a decoder
    language model (calibrated on ``data`` text). Returns the summary (also in prune.json)."""
    import torch

    from lmforge.deploy import prune as P
    from lmforge.models import Encoder

    output = Path(output)
    _refuse_existing(output, overwrite)
    source = open_source(model)
    from lmforge.deploy.quantize import is_quantized

    if is_quantized(source.model):
        raise ConfigError([f"{model}: prune the fp32 model, then quantise the pruned one"])
    if getattr(source.model, "causal", False) and not source.is_task:
        from lmforge.data.sources import read_documents

        P.choose_removals([torch.zeros(2)], 0.0, "heads")  # nothing structured for decoders
        texts = list(read_documents(data, text_mode="lines"))
        calibration = P.token_batches(source.tokenizer, texts, 128, 32)
        held_texts = list(read_documents(eval_data, text_mode="lines")) if eval_data else texts
        held_out = P.token_batches(source.tokenizer, held_texts[::-1], 128, 16)
        before = P.perplexity(source.model, held_out)
        summary: dict[str, Any] = {"method": "wanda", **P.wanda(source.model, calibration, sparsity)}
        summary.update(perplexity_before=before, perplexity_after=P.perplexity(source.model, held_out),
                       note="zeros in dense matrices: the folder is not smaller and nothing runs faster "
                            "without sparse kernels")
        write_like(source, source.model, output, extra={"pruning": summary})
        return summary
    if not source.is_task or not isinstance(source.model, Encoder):
        raise ConfigError([f"{model}: structured pruning ranks the heads of a fine-tuned BERT-family encoder by "
                           "its task loss; give a fine-tuned encoder run (decoder language models take Wanda "
                           "--sparsity)"])
    layers = source.model.layers
    P.choose_removals([torch.zeros(layer.attention.num_heads) for layer in layers], heads, "heads")
    P.choose_removals([torch.zeros(layer.intermediate.out_features) for layer in layers], ffn, "ffn")
    task, objective = source.task, source.objective
    features = task.encode_all(task.read(data, "train"))
    evaluation = None
    if eval_data:
        evaluation = task.read(eval_data, "validation")
        evaluation = (evaluation, task.encode_all(evaluation))

    def measure() -> dict[str, float] | None:
        if evaluation is None:
            return None
        metrics, _ = task.evaluate(objective, evaluation[0], evaluation[1], 64)
        return metrics

    parameters_before = sum(p.numel() for p in source.model.parameters())
    metrics_before = measure()
    head_scores, neuron_scores = P.unit_importance(objective, task, features, batch_size, progress=progress)
    head_cut = P.choose_removals(head_scores, heads, "heads")
    neuron_cut = P.choose_removals(neuron_scores, ffn, "ffn")
    objective.model = P.prune_encoder(source.model, head_cut, neuron_cut)
    metrics_pruned = measure()
    losses = P.recover(objective, task, features, recover_steps, recover_lr, batch_size, progress=progress)
    summary = {
        "method": "structured", "heads_removed": head_cut, "neurons_removed": sum(len(n) for n in neuron_cut),
        "heads_per_layer": [layer.attention.num_heads for layer in objective.model.layers],
        "intermediate_per_layer": [layer.intermediate.out_features for layer in objective.model.layers],
        "parameters_before": parameters_before,
        "parameters_after": sum(p.numel() for p in objective.model.parameters()),
        "recover_steps": recover_steps, "recover_loss_last": losses[-1] if losses else None,
        "metrics_before": metrics_before, "metrics_pruned": metrics_pruned, "metrics_recovered": measure(),
    }
    write_like(source, objective.model.eval(), output, extra={"pruning": summary}, head=objective.head)
    return summary


def distill_folder(teacher: str | Path, output: str | Path, data: list[str], student_layers: int | None = None,
                   student: str | None = None, steps: int | None = None, epochs: float = 3.0,
                   lr: float | None = None, temperature: float = 2.0, soft_weight: float = 1.0,
                   hidden_weight: float = 1.0, relation_weight: float = 1.0, batch_size: int = 32,
                   eval_data: list[str] | None = None, seed: int = 0, overwrite: bool = False,
                   progress: bool = False) -> dict[str, Any]:
    """Distil a fine-tuned encoder into a smaller student (see ``lmforge.deploy.distill``);
    ``data`` needs the task's inputs only (labels, if present, are not used)."""
    import torch

    from lmforge.deploy import distill as D
    from lmforge.tasks.base import steps_for_epochs

    output = Path(output)
    _refuse_existing(output, overwrite)
    source = open_source(teacher)
    if not source.is_task:
        raise ConfigError([f"{teacher}: distillation needs a fine-tuned task run as the teacher"])
    task = source.task
    torch.manual_seed(seed)
    student_objective = D.build_student(source.objective, task, student_layers, student)
    features = task.encode_all(task.read(data, "train", labeled=False), labeled=False)
    steps = steps or steps_for_epochs(epochs, len(features), batch_size)
    lr = lr or (1e-4 if student_layers is not None else 5e-4)
    weights = D.DistillWeights(soft_weight, hidden_weight, relation_weight, temperature)
    losses = D.distill(source.objective, student_objective, task, features, steps, lr, weights, batch_size, seed,
                       progress)
    summary: dict[str, Any] = {
        "student_layers": student_objective.model.config.num_layers, "student": student,
        "teacher_layers_used": D.teacher_layers(source.model.config.num_layers,  # type: ignore[union-attr]
                                                student_objective.model.config.num_layers),
        "steps": steps, "lr": lr, "weights": weights.__dict__, "loss_first": losses[0], "loss_last": losses[-1],
        "parameters_teacher": sum(p.numel() for p in source.model.parameters()),
        "parameters_student": sum(p.numel() for p in student_objective.model.parameters()),
    }
    if eval_data:
        examples = task.read(eval_data, "validation")
        encoded = task.encode_all(examples)
        summary["metrics_teacher"], _ = task.evaluate(source.objective, examples, encoded, 64)
        summary["metrics_student"], _ = task.evaluate(student_objective, examples, encoded, 64)
    write_like(source, student_objective.model, output, extra={"distillation": summary}, head=student_objective.head)
    return summary

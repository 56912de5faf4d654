"""lmforge model folders, and one loader for every kind of weights a user may hold.

An lmforge model folder holds ``model.safetensors`` (our key names), ``config.json``
(``{"lmforge_version", "kind", "model": {...}}``) and the tokenizer files. It is written
to a temporary folder and renamed, so a crash never leaves half a checkpoint.
``load_pretrained`` opens that, a Hugging Face folder, or a ``.gguf`` file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lmforge.errors import CorruptFileError, WeightsError
from lmforge.fileio import atomic_directory, load_tensors, read_json, save_tensors, write_json
from lmforge.models import Decoder, Encoder, MaskedLM, config_from_dict
from lmforge.tokenizer import Tokenizer

FORMAT_VERSION = 1
MODEL_CLASSES: dict[str, type[nn.Module]] = {"Encoder": Encoder, "MaskedLM": MaskedLM, "Decoder": Decoder}


def save_model(
    model: nn.Module,
    folder: str | Path,
    tokenizer: Tokenizer | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and tokenizer) as an lmforge model folder, atomically."""
    folder = Path(folder)
    with atomic_directory(folder) as tmp:
        write_model_files(model, tmp, tokenizer, extra)
    return folder


def write_model_files(
    model: nn.Module, folder: Path, tokenizer: Tokenizer | None = None, extra: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
) -> None:
    """The files of a model folder, written into an existing (temporary) folder; ``state``
    replaces ``model.state_dict()`` (the gathered weights of a sharded model)."""
    kind = type(model).__name__
    if kind not in MODEL_CLASSES:
        raise TypeError(f"cannot save {kind}; expected one of {', '.join(MODEL_CLASSES)}")
    config = {"lmforge_version": FORMAT_VERSION, "kind": kind, "model": model.config.to_dict(),  # type: ignore[union-attr,operator]
              **(extra or {})}
    if getattr(model, "peft_config", None):  # load_model re-applies the method, then loads its tensors
        config["peft"] = model.peft_config
    if getattr(model, "quantization", None):  # load_model rebuilds the quantised modules first
        config["quantization"] = model.quantization
    save_tensors(dict(model.state_dict()) if state is None else state, folder / "model.safetensors", metadata={"format": "pt"})
    write_json(folder / "config.json", config)
    if tokenizer is not None:
        tokenizer.save(folder)


def is_lmforge_folder(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and "lmforge_version" in read_json(config)


def load_model(folder: str | Path) -> nn.Module:
    """The model stored in an lmforge model folder (strict: every tensor must match)."""
    from lmforge.weights import build_from_state

    folder = Path(folder)
    meta = read_json(folder / "config.json")
    kind = meta.get("kind")
    if kind not in MODEL_CLASSES:
        raise CorruptFileError(f"{folder / 'config.json'}: kind={kind!r} is not one of {', '.join(MODEL_CLASSES)}")
    tensors = load_tensors(folder / "model.safetensors")
    build: Any = MODEL_CLASSES[kind]
    quantization = meta.get("quantization")
    if quantization:
        from lmforge.deploy.quantize import quantized_builder

        build = quantized_builder(build, quantization)
    if meta.get("peft"):
        from lmforge.peft import PeftSection, apply_peft, load_adapter_tensors, split_peft_state

        base, adapter = split_peft_state(tensors, meta["peft"]["method"])
        if meta["peft"]["method"] == "bitfit":
            adapter = {k: v for k, v in base.items() if k.endswith(".bias")}
        model = build_from_state(build, config_from_dict(meta["model"]), base, str(folder))
        model.quantization = quantization
        apply_peft(model, PeftSection(**meta["peft"]))
        load_adapter_tensors(model, adapter, str(folder))
        return model.eval()
    model = build_from_state(build, config_from_dict(meta["model"]), tensors, str(folder))
    model.quantization = quantization
    return model.eval()


def load_tokenizer(folder: Path) -> Tokenizer | None:
    if (folder / "tokenizer.json").exists() or (folder / "vocab.txt").exists():
        return Tokenizer.load(folder)
    return None


def load_pretrained(path: str | Path, with_mlm_head: bool | None = None) -> tuple[nn.Module, Tokenizer | None]:
    """Model and tokenizer from an lmforge folder, a Hugging Face folder or a GGUF file;
    a tokenizer with more tokens than the model has embeddings is refused here, not at
    the first out-of-range id."""
    model, tokenizer = _load_pretrained(Path(path), with_mlm_head)
    vocabulary = getattr(getattr(model, "config", None), "vocab_size", None)
    if tokenizer is not None and vocabulary is not None and tokenizer.vocab_size > vocabulary:
        raise WeightsError(f"{path}: the tokenizer has {tokenizer.vocab_size:,} tokens but the model has embeddings "
                           f"for {vocabulary:,}: they do not belong together (use the model's own tokenizer)")
    return model, tokenizer


def _load_pretrained(path: Path, with_mlm_head: bool | None) -> tuple[nn.Module, Tokenizer | None]:
    if path.is_file():
        from lmforge.interop.gguf import load_gguf

        return load_gguf(path)
    if not path.is_dir():
        raise CorruptFileError(f"{path}: no such file or folder")
    if not (path / "config.json").exists():
        raise CorruptFileError(f"{path}: not a model folder (no config.json)")
    if is_lmforge_folder(path):
        model = load_model(path)
    else:
        from lmforge.interop.hf import load_hf

        model, _ = load_hf(path, with_mlm_head=with_mlm_head)
        model.eval()
    return model, load_tokenizer(path)

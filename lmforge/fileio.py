"""Safe file handling: atomic writes and weight files read without unpickling."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import CorruptFileError


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target``.

    If anything fails inside the block, the temporary folder is removed and whatever was at
    ``target`` before is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for child in tmp.iterdir():  # make file contents durable before the rename
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CorruptFileError(f"{path}: not valid JSON ({error})") from error


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors (contiguous, untied copies)."""
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file: safetensors, or a PyTorch .bin/.pt with ``weights_only=True``.

    A truncated or foreign file raises ``CorruptFileError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            size = path.stat().st_size
            raise CorruptFileError(
                f"{path}: cannot read safetensors file ({size} bytes; truncated or not "
                f"safetensors): {error}"
            ) from error
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for foreign or damaged files
        raise CorruptFileError(f"{path}: cannot read PyTorch weights safely: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptFileError(f"{path}: expected a flat dict of tensors")
    return state

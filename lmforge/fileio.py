"""Safe file handling: atomic writes and weight files read without unpickling."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmforge.errors import CorruptFileError, DiskFullError


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
    except OSError as error:
        written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if error.errno == errno.ENOSPC:
            free = shutil.disk_usage(target.parent).free
            raise DiskFullError(f"no space left on the device of {target.parent} while writing {target.name} "
                                f"({written / 2**20:,.0f} MB written, {free / 2**20:,.0f} MB free); what was there "
                                "before is intact") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    """Write text through a temporary file and a rename (an old file survives a failure)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_figure(figure: Any, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    figure.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    return path


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
        return read_safetensors(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for foreign or damaged files
        raise CorruptFileError(f"{path}: cannot read PyTorch weights safely: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptFileError(f"{path}: expected a flat dict of tensors")
    return state


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file into memory the process owns (no memory map).

    A mapped file stays resident, and counted in RSS, for as long as any tensor of it
    lives; reading into owned buffers lets a model re-lay its weights without holding two
    copies. The format is an 8-byte header length, a JSON header, then raw tensor bytes.
    """
    path = Path(path)
    size = path.stat().st_size

    def corrupt(reason: str) -> CorruptFileError:
        return CorruptFileError(f"{path}: cannot read safetensors file ({size} bytes; truncated or not safetensors): "
                                f"{reason}")

    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise corrupt("shorter than the 8-byte header length")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > min(size - 8, 100_000_000):
            raise corrupt(f"header length {header_length} exceeds the file")
        try:
            header = json.loads(handle.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise corrupt(f"header is not JSON ({error})") from error
        data_start = 8 + header_length
        tensors: dict[str, torch.Tensor] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise corrupt(f"tensor {name} has unsupported dtype {entry.get('dtype')!r}")
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            tensor = torch.empty(shape, dtype=dtype)
            if tensor.numel() * tensor.element_size() != end - begin:
                raise corrupt(f"tensor {name}: shape {shape} does not match its {end - begin} bytes")
            if data_start + end > size:
                raise corrupt(f"tensor {name} ends at byte {data_start + end}, past the end of the file")
            handle.seek(data_start + begin)
            if end > begin:
                buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                if handle.readinto(buffer) != end - begin:
                    raise corrupt(f"tensor {name} is cut short")
            tensors[name] = tensor
    return tensors


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_manifest(folder: str | Path, skip: Sequence[str] = ("logs",)) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` by relative path (``manifest.json`` itself and
    the ``skip`` sub-folders left out)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json" and not set(skip) & set(p.relative_to(folder).parts)}


def check_manifest(folder: str | Path, what: str) -> None:
    """Refuse a folder whose files differ from its ``manifest.json`` (naming them)."""
    folder = Path(folder)
    if not (folder / "manifest.json").exists():
        raise CorruptFileError(f"{folder}: manifest.json is missing; rebuild the {what}")
    recorded, actual = read_json(folder / "manifest.json"), folder_manifest(folder)
    changed = sorted(name for name in set(recorded) | set(actual) if recorded.get(name) != actual.get(name))
    if changed:
        raise CorruptFileError(f"{folder}: files changed since the build: {', '.join(changed[:6])}; rebuild the "
                               f"{what} instead of editing it")


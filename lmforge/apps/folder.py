"""What the application folders (a support KB, a recommender) share: opening one with its
checks, and its encoder with the stored vectors checked against it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.errors import CorruptFileError
from lmforge.fileio import check_manifest, read_json
from lmforge.retrieval.encoder import SentenceEncoder
from lmforge.retrieval.index import VectorIndex


def open_folder(folder: Path, settings_file: str, version: int, what: str, command: str) -> dict[str, Any]:
    """The folder's settings, once it is known to be one (``settings_file`` present), unchanged
    since the build (every file against manifest.json) and of this lmforge's ``version``."""
    if not (folder / settings_file).exists():
        raise CorruptFileError(f"{folder}: not a {what} (no {settings_file}); build one with `{command}`")
    check_manifest(folder, f"{what} ({command})")
    settings: dict[str, Any] = read_json(folder / settings_file)
    if settings.get("version") != version:
        raise CorruptFileError(f"{folder}: {what} version {settings.get('version')}; this lmforge reads {version}")
    return settings


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_encoder_and_vectors(folder: Path, max_tokens: int, count: int, probe: str, what: str
                             ) -> tuple[SentenceEncoder, VectorIndex]:
    """``folder/encoder`` and ``folder/index`` vectors, refused when they do not belong
    together: another count or width, or the first stored vector (of the text ``probe``) not
    what the encoder makes of it (a swapped encoder folder)."""
    from lmforge.checkpoint import load_pretrained

    model, tokenizer = load_pretrained(folder / "encoder")
    if tokenizer is None:
        raise CorruptFileError(f"{folder / 'encoder'}: no tokenizer")
    encoder = SentenceEncoder(model, tokenizer, max_tokens)
    vectors = VectorIndex.load(folder / "index")
    if len(vectors) != count or vectors.vectors.shape[1] != encoder.dim:
        raise CorruptFileError(f"{folder}: the index holds {len(vectors)} vectors of width {vectors.vectors.shape[1]} "
                               f"for {count} {what} and an encoder of width {encoder.dim}: it was built with another "
                               "encoder")
    cosine = float(encoder.embed([probe])[0] @ vectors.vectors[0])
    if cosine < 0.99:
        raise CorruptFileError(f"{folder}: the stored vectors do not come from the encoder in {folder / 'encoder'} "
                               f"(cosine {cosine:.3f} on the first of the {what}): it was built with another encoder; "
                               "rebuild the folder")
    return encoder, vectors

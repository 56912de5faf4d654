"""Documents and labeled examples from user files.

Formats: plain text (one document per file, per blank-line block, or per line), JSONL,
CSV/TSV and Parquet, with configurable field names; paths may be globs. Everything
streams: nothing reads a whole file into memory except Parquet row groups.

A malformed record raises ``DataError`` naming the file and line. With
``on_error="skip"`` it is skipped instead and counted in ``SourceStats`` (and logged).
"""

from __future__ import annotations

import csv
import glob
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.errors import DataError

log = logging.getLogger(__name__)

TextMode = Literal["file", "blocks", "lines"]
OnError = Literal["raise", "skip"]
FORMATS = ("text", "jsonl", "csv", "tsv", "parquet", "atomic")


@dataclass
class SourceStats:
    """What a read saw: records yielded and malformed records skipped (with where)."""

    records: int = 0
    skipped: int = 0
    examples_of_skips: list[str] = field(default_factory=list)

    def skip(self, message: str) -> None:
        self.skipped += 1
        if len(self.examples_of_skips) < 5:
            self.examples_of_skips.append(message)

    def log(self, what: str) -> None:
        if self.skipped:
            log.warning("%s: skipped %d malformed record(s), e.g. %s", what, self.skipped,
                        "; ".join(self.examples_of_skips))


def expand_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files named by paths or glob patterns, sorted; a pattern matching nothing is an error."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[Path] = []
    for pattern in paths:
        pattern = str(pattern)
        if any(ch in pattern for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"{pattern}: no file matches this pattern")
            found.extend(matches)
        else:
            path = Path(pattern)
            if not path.is_file():
                raise DataError(f"{path}: no such file")
            found.append(path)
    return found


def detect_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    for suffix in reversed(suffixes):
        name = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
                ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text",
                ".inter": "atomic", ".item": "atomic", ".user": "atomic"}.get(suffix)
        if name:
            return name
    return "text"


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) with a clear error for bytes that are not UTF-8."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{path}:{number}: not valid UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1}); "
                    "convert the file to UTF-8"
                ) from error


def _text_documents(path: Path, mode: TextMode) -> Iterator[tuple[int, str]]:
    if mode == "lines":
        for number, line in text_lines(path):
            if line.strip():
                yield number, line.rstrip("\r\n")
        return
    block: list[str] = []
    start = 1
    for number, line in text_lines(path):
        if mode == "blocks" and not line.strip():
            if block:
                yield start, "".join(block).strip("\r\n")
                block = []
            start = number + 1
            continue
        if not block:
            start = number
        block.append(line)
    if block and "".join(block).strip():
        yield start, "".join(block).strip("\r\n")


def _starts_array_of_objects(line: str) -> bool:
    """Whether a first line opens a JSON array file (``[`` alone, or ``[{...}, ...]``)."""
    try:
        value = json.loads(line)
    except ValueError:
        return True  # an array continued on the next lines
    return isinstance(value, list) and any(isinstance(item, dict) for item in value)


def _records(path: Path, fmt: str, on_error: OnError, stats: SourceStats) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row number, record dict) for structured formats."""
    if fmt == "jsonl":
        first = True
        for number, line in text_lines(path):
            if not line.strip():
                continue
            if first and line.lstrip().startswith("[") and _starts_array_of_objects(line):
                raise DataError(f"{path}:{number}: this is a JSON array; lmforge reads JSON Lines (one object per "
                                "line) or, for qa, SQuAD JSON: write one example per line")
            first = False
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, found {type(record).__name__}")
            except ValueError as error:
                message = f"{path}:{number}: malformed JSON line ({error})"
                if on_error == "raise":
                    raise DataError(message) from error
                stats.skip(message)
                continue
            yield number, record
    elif fmt in ("csv", "tsv", "atomic"):
        # atomic: RecBole's .inter / .item / .user files, TSV whose header names carry a type
        # ("user_id:token"); the names are read without it, and quotes are not special
        text = (line for _, line in text_lines(path))
        reader = csv.DictReader(text, delimiter="," if fmt == "csv" else "\t",
                                quoting=csv.QUOTE_NONE if fmt == "atomic" else csv.QUOTE_MINIMAL)
        if fmt == "atomic":
            reader.fieldnames = [name.split(":", 1)[0] for name in reader.fieldnames or []]
        for record in reader:
            number = reader.line_num
            if None in record or any(v is None for v in record.values()):
                found = len(reader.fieldnames or []) + len(record[None]) if None in record else \
                    sum(v is not None for v in record.values())
                hint = " (an unquoted separator inside a value? quote that value)" if None in record else ""
                message = f"{path}:{number}: row has {found} fields where the header has " \
                          f"{len(reader.fieldnames or [])}{hint}"
                if on_error == "raise":
                    raise DataError(message)
                stats.skip(message)
                continue
            yield number, record
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table_file = pq.ParquetFile(path)
        except Exception as error:
            raise DataError(f"{path}: cannot read Parquet file ({error})") from error
        row = 0
        for group in range(table_file.num_row_groups):
            for record in table_file.read_row_group(group).to_pylist():
                row += 1
                yield row, record
    else:
        raise DataError(f"{path}: format {fmt!r} is not one of {', '.join(FORMATS)}")


def read_documents(
    paths: str | Path | Sequence[str | Path],
    fmt: str | None = None,
    text_field: str = "text",
    text_mode: TextMode = "blocks",
    on_error: OnError = "raise",
    stats: SourceStats | None = None,
) -> Iterator[str]:
    """Yield document texts from files. ``fmt`` None detects it from each file's suffix.

    text files: ``text_mode`` "file" (whole file), "blocks" (blank-line separated) or
    "lines"; structured files: the ``text_field`` of each record.
    """
    stats = stats if stats is not None else SourceStats()
    files = expand_paths(paths)
    for path in files:
        kind = fmt or detect_format(path)
        if kind == "text":
            for _, text in _text_documents(path, text_mode):
                stats.records += 1
                yield text
            continue
        for number, record in _records(path, kind, on_error, stats):
            value = record.get(text_field)
            if not isinstance(value, str) or not value.strip():
                problem = "missing" if value is None else ("empty" if isinstance(value, str) else
                                                           f"not text ({type(value).__name__})")
                message = f"{path}:{number}: field {text_field!r} is {problem} (fields present: {', '.join(record)})"
                if on_error == "raise":
                    raise DataError(message)
                stats.skip(message)
                continue
            stats.records += 1
            yield value
    stats.log(", ".join(str(f) for f in files))
    if stats.records == 0:
        raise DataError(f"no documents found in {', '.join(str(f) for f in files)}")


def read_examples(
    paths: str | Path | Sequence[str | Path],
    fields: dict[str, str],
    fmt: str | None = None,
    required: Sequence[str] | None = None,
    on_error: OnError = "raise",
    stats: SourceStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield labeled examples as dicts keyed by our names.

    fields: our name -> the file's field name (e.g. {"text": "review", "label": "stars"}).
    required: our names that must be present and non-empty (default: all of ``fields``).
    Each example also carries ``_source`` ("file:line") for error messages downstream.
    """
    stats = stats if stats is not None else SourceStats()
    required = list(fields) if required is None else list(required)
    files = expand_paths(paths)
    for path in files:
        kind = fmt or detect_format(path)
        if kind == "text":
            raise DataError(f"{path}: labeled examples need JSONL, CSV/TSV or Parquet, not plain text")
        for number, record in _records(path, kind, on_error, stats):
            example: dict[str, Any] = {}
            problem = None
            for ours, theirs in fields.items():
                value = record.get(theirs)
                if ours in required and (value is None or (isinstance(value, str) and not value.strip())):
                    state = "missing" if theirs not in record or value is None else "empty"
                    problem = f"{path}:{number}: field {theirs!r} is {state} (fields present: {', '.join(record)})"
                    break
                example[ours] = value
            if problem:
                if on_error == "raise":
                    raise DataError(problem)
                stats.skip(problem)
                continue
            example["_source"] = f"{path}:{number}"
            stats.records += 1
            yield example
    stats.log(", ".join(str(f) for f in files))
    if stats.records == 0:
        raise DataError(f"no examples found in {', '.join(str(f) for f in files)}")


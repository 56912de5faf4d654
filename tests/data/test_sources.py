"""User files: every supported format, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.sources import SourceStats, read_documents, read_examples
from lmforge.errors import DataError


def test_text_modes(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first block\nstill first\n\nsecond block\n\n\nthird\n")
    assert list(read_documents(tmp_path / "a.txt")) == ["first block\nstill first", "second block", "third"]
    assert list(read_documents(tmp_path / "a.txt", text_mode="lines")) == [
        "first block", "still first", "second block", "third"]
    assert len(list(read_documents(tmp_path / "a.txt", text_mode="file"))) == 1


def test_globs_jsonl_csv_tsv_parquet(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"review": "good", "stars": 1}\n\n{"review": "bad", "stars": 0}\n')
    (tmp_path / "y.csv").write_text('review,stars\n"nice, really",1\n')
    (tmp_path / "z.tsv").write_text("review\tstars\nmeh\t0\n")
    pq.write_table(pa.table({"review": ["parquet row"], "stars": [1]}), tmp_path / "w.parquet")
    examples = list(read_examples(str(tmp_path / "*"), {"text": "review", "label": "stars"}))
    assert [(e["text"], str(e["label"])) for e in examples] == [
        ("parquet row", "1"), ("good", "1"), ("bad", "0"), ("nice, really", "1"), ("meh", "0")]
    assert examples[2]["_source"].endswith("x.jsonl:3")
    assert list(read_documents(tmp_path / "x.jsonl", text_field="review")) == ["good", "bad"]


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken\n{"text": "fine"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: malformed JSON line"):
        list(read_documents(path))
    stats = SourceStats()
    assert list(read_documents(path, on_error="skip", stats=stats)) == ["ok", "fine"]
    assert stats.skipped == 1 and "data.jsonl:2" in stats.examples_of_skips[0]


def test_missing_and_empty_fields(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: field 'label' is missing \(fields present: text\)"):
        list(read_examples(path, {"text": "text", "label": "label"}))
    path.write_text('{"text": "  ", "label": 1}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:1: field 'text' is empty"):
        list(read_examples(path, {"text": "text", "label": "label"}))


def test_non_utf8_bytes_are_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("line one\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt:2: not valid UTF-8 \(byte 0xe9 at column 4\)"):
        list(read_documents(path))


def test_empty_corpus_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(DataError, match="no documents found"):
        list(read_documents(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match="no file matches this pattern"):
        list(read_documents(str(tmp_path / "*.jsonl")))
    with pytest.raises(DataError, match="no such file"):
        list(read_documents(tmp_path / "nope.txt"))


def test_csv_row_with_wrong_field_count(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\nfine,1\ntoo,many,fields\n")
    with pytest.raises(DataError, match=r"d\.csv:3: row has"):
        list(read_examples(path, {"text": "text", "label": "label"}))


def test_json_value_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(["a", "list"]) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: malformed JSON line \(expected a JSON object"):
        list(read_documents(path))


def test_a_csv_row_with_an_extra_separator_gives_its_true_field_count(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("text,label\ngood film,pos\ngreat, really,pos\nshort\n")
    with pytest.raises(DataError, match=r"data\.csv:3: row has 3 fields where the header has 2 \(an unquoted"):
        list(read_examples(path, {"text": "text", "label": "label"}))
    path.write_text("text,label\nshort\n")
    with pytest.raises(DataError, match=r"data\.csv:2: row has 1 fields where the header has 2$"):
        list(read_examples(path, {"text": "text", "label": "label"}))


def test_a_json_array_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a", "label": 1},\n  {"text": "b", "label": 0}\n]\n')
    with pytest.raises(DataError, match=r"data\.json:1: this is a JSON array; lmforge reads JSON Lines"):
        list(read_examples(path, {"text": "text", "label": "label"}, on_error="skip"))

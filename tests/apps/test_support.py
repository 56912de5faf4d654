"""The support assistant: build, ask and eval end to end; follow-ups; handoff; grounded
generation; bad FAQ files; a changed or foreign knowledge base refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmforge.apps.support import Assistant, GroundedWriter, KnowledgeBase, evaluate_kb, evaluation_entries, read_faq, support_of
from lmforge.cli import main
from lmforge.errors import CorruptFileError, DataError
from lmforge.eval.metrics import retrieval_metrics
from lmforge.fileio import folder_manifest
from tests.apps.conftest import FAQ, write_faq


@pytest.fixture(scope="module")
def kb(kb_dir: Path) -> KnowledgeBase:
    return KnowledgeBase.load(kb_dir)


def test_build_writes_a_checked_folder_with_a_split_and_validation_choices(kb_dir: Path, kb: KnowledgeBase) -> None:
    settings = json.loads((kb_dir / "kb.json").read_text())
    counts = settings["split"]["counts"]
    assert sum(counts.values()) == len(FAQ) == len(kb.entries) and counts["test"] > 0 and counts["validation"] > 0
    assert settings["encoder"]["trained"]["steps"] >= 1 and settings["faq"]["entries"] == len(FAQ)
    assert set(settings["validation"]["alpha_mrr"]) and 0.0 <= kb.alpha <= 1.0
    assert sorted(settings["categories"]) == ["contracts", "permits", "renovation", "tax"]
    manifest = json.loads((kb_dir / "manifest.json").read_text())
    assert {"encoder/model.safetensors", "index/vectors.faiss", "entries.jsonl", "kb.json"} <= set(manifest)


def test_ask_returns_the_matching_entry_with_category_and_score(kb: KnowledgeBase) -> None:
    result = kb.ask("how much will my new kitchen cost me?")
    assert result["entry"]["id"] == "kitchen-cost" and result["answer"].startswith("A new kitchen")
    assert result["category"]["label"] == "renovation" and not result["handoff"]
    assert result["score"] == result["candidates"][0]["score"] >= result["candidates"][1]["score"]


def test_eval_scores_held_out_questions_for_every_ranker(kb: KnowledgeBase) -> None:
    pairs = evaluation_entries(kb)
    assert pairs and all(entry.split == "test" for entry, _ in pairs)
    summary = evaluate_kb(kb, pairs)
    assert set(summary["rankers"]) == {"bm25", "dense", "hybrid"}
    assert summary["hit@1"] == summary["rankers"]["hybrid"]["hit@1"] and 0 <= summary["hit@1"] <= summary["hit@5"] <= 1
    assert summary["hit@5"] >= 0.5  # the questions are paraphrase-close to their answers
    assert summary["latency_ms_p99"] >= summary["latency_ms_p50"] > 0


def test_cli_build_ask_and_eval_print_json(kb_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["app", "support", "ask", "--kb", str(kb_dir), "Does ROT cover the materials too?"]) == 0
    assert json.loads(capsys.readouterr().out)["entry"]["id"] == "rot-materials"
    assert main(["app", "support", "eval", "--kb", str(kb_dir), "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"hit@1", "hit@5", "mrr@10", "category_accuracy", "latency_ms_p99"} <= set(last)


def test_a_follow_up_is_read_with_the_session_history(kb: KnowledgeBase, tmp_path: Path) -> None:
    assistant = Assistant(kb, log_dir=tmp_path)
    first = assistant.chat("How do I apply for a building permit?")
    assert first["entry"]["id"] == "permit-apply"
    follow = assistant.chat("and how long does that take?", first["session_id"])
    assert follow["query"] != follow["question"] and "building permit" in follow["query"]
    assert follow["entry"]["id"] == "permit-time"
    other = assistant.chat("How much does a new kitchen cost?")
    kitchen = assistant.chat("and how long does that take?", other["session_id"])
    assert kitchen["entry"]["id"] == "kitchen-time"  # the same words, another history


def test_a_low_confidence_question_hands_off_and_is_logged(kb: KnowledgeBase, tmp_path: Path) -> None:
    assistant = Assistant(kb, log_dir=tmp_path)
    result = assistant.chat("What is the boiling point of mercury in kelvin?")
    assert result["handoff"] and result["score"] < kb.threshold and "colleague" in result["answer"]
    logged = [json.loads(line) for line in (tmp_path / "handoffs.jsonl").read_text().splitlines()]
    assert len(logged) == 1 and logged[0]["session_id"] == result["session_id"]
    assert assistant.handoffs() == logged
    assert not assistant.chat("What does a building permit cost?")["handoff"]


def test_generated_answers_come_only_from_retrieved_text(kb: KnowledgeBase, tiny_decoder_dir: Path,
                                                         tmp_path: Path) -> None:
    writer = GroundedWriter.load(tiny_decoder_dir, max_new_tokens=12)
    passages = [kb.entries[kb.position["rot-limit"]].answer]
    written = writer.write("What is the ROT limit?", passages)
    # a tiny random decoder writes words absent from the passage: the retrieved text is given
    assert not written["generated"] and written["answer"] == passages[0] and written["support"] < 0.8
    assistant = Assistant(kb, writer, tmp_path)
    result = assistant.chat("What is the most ROT I can deduct in a year?", generate=True)
    assert result["answer"] in {e.answer for e in kb.entries} and result["citations"] == [1]


def test_support_counts_the_answer_words_found_in_the_passages() -> None:
    assert support_of("The fee is 25,000 SEK [1]", ["A fee of 25,000 SEK applies."]) == 1.0
    assert support_of("Mercury boils at 630 kelvin", ["A fee of 25,000 SEK applies."]) == 0.0


@pytest.mark.parametrize("lines, message", [
    (['{"question": "What is ROT?", "answer": "A deduction."}', '{"question": "What is RUT?"}'],
     "field 'answer' is missing"),
    (['{"question": "What is ROT?", "answer": "A deduction."}', '{"question": "What is RUT?", "answer": " "}'],
     "field 'answer' is empty"),
    (['{"question": "What is ROT?", "answer": "A deduction."}', '{"question": "what is  ROT?", "answer": "Other."}'],
     "with a different answer"),
])
def test_bad_faq_files_are_clear_errors_with_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "faq.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message) as error:
        read_faq(path, category_field=None)
    assert f"{path}:2" in str(error.value)
    csv_path = write_faq(tmp_path / "faq.csv", [("a", "x", "What is ROT?", "A deduction."), ("b", "x", "Why?", "")])
    with pytest.raises(DataError, match=f"{csv_path}:3: field 'answer' is empty"):
        read_faq(csv_path)


def test_duplicate_questions_can_be_merged_on_request(tmp_path: Path) -> None:
    path = write_faq(tmp_path / "faq.csv", [("a", "x", "What is ROT?", "A deduction."),
                                            ("b", "x", "What is ROT?", "Labour only."),
                                            ("c", "x", "What is ROT?", "A deduction.")])
    entries = read_faq(path, duplicates="merge")
    assert len(entries) == 1 and entries[0].answer == "A deduction.\n\nLabour only."


def test_a_changed_or_foreign_knowledge_base_is_refused(kb_dir: Path, tmp_path: Path, tiny_encoder_dir: Path) -> None:
    changed = tmp_path / "changed"
    shutil.copytree(kb_dir, changed)
    with open(changed / "entries.jsonl", "a") as handle:
        handle.write("\n")
    with pytest.raises(CorruptFileError, match="entries.jsonl"):
        KnowledgeBase.load(changed)
    foreign = tmp_path / "foreign"
    shutil.copytree(kb_dir, foreign)
    shutil.rmtree(foreign / "encoder")
    shutil.copytree(tiny_encoder_dir, foreign / "encoder")
    manifest = json.loads((foreign / "manifest.json").read_text())
    (foreign / "manifest.json").write_text(json.dumps({**manifest, **folder_manifest(foreign)}))
    with pytest.raises(CorruptFileError, match="another encoder"):
        KnowledgeBase.load(foreign)


def test_retrieval_metrics_known_answers() -> None:
    metrics = retrieval_metrics([[3, 1, 2], [5, 6, 7], [9, 8]], [1, 4, {8, 9}], ks=(1, 2))
    assert metrics["hit@1"] == pytest.approx(1 / 3) and metrics["hit@2"] == pytest.approx(2 / 3)
    assert metrics["mrr@2"] == pytest.approx((1 / 2 + 0 + 1) / 3)
    ndcg_first = (1 / np.log2(3)) / 1.0  # relevant at rank 2 of one relevant item
    assert metrics["ndcg@2"] == pytest.approx((ndcg_first + 0 + 1.0) / 3)
    assert metrics["recall@1"] == pytest.approx((0 + 0 + 0.5) / 3)

"""Exports other runtimes open with the same numbers: ONNX through onnxruntime, Hugging Face
folders through transformers' AutoModelFor..., GGUF read back by gguf and by lmforge; what a
format cannot hold is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_pretrained
from lmforge.cli import main
from lmforge.deploy import export_model, quantize_folder
from lmforge.deploy.hf_heads import hf_logits
from lmforge.errors import ConfigError, UnknownArchitectureError
from lmforge.recipes.finetune import evaluate_model, load_task_model, predict_file
from lmforge.tasks.base import BucketedLoader


def _batch(task_run: Path, data: Path, size: int = 8) -> tuple[object, dict[str, torch.Tensor]]:
    task, objective = load_task_model(task_run)
    examples = task.read([str(data)], "test")
    features = task.encode_all(examples)[:size]
    batch = next(iter(BucketedLoader(features, size, task.tokenizer.pad_id or 0, shuffle=False)))
    return task, objective, batch


@pytest.mark.parametrize("name", ["classify", "ner", "qa", "relation", "pair-score"])
def test_onnx_export_matches_torch_for_every_task(name: str, task_runs: dict, tmp_path: Path) -> None:
    run, held_out = task_runs[name]
    summary = export_model(run, "onnx", tmp_path / "onnx")
    assert summary["parity_max_abs"] <= 1e-4
    task, objective, batch = _batch(run, held_out)
    _, onnx_objective = load_task_model(tmp_path / "onnx")
    with torch.no_grad():
        expected = objective(batch, scores_only=True)
    found = onnx_objective(batch, scores_only=True)
    if found.dim() == 3:  # per-token scores: padding positions are never read
        keep = batch["attention_mask"].bool()
        found, expected = found[keep], expected[keep]
    assert torch.allclose(found, expected, atol=1e-4)


def test_crf_tagger_exports_its_transitions_and_decodes_the_same(task_runs: dict, tmp_path: Path) -> None:
    import shutil

    source, held_out = task_runs["ner"]  # NER trains a CRF by default
    run = shutil.copytree(source, tmp_path / "run")  # the shared run stays as it was
    task, _ = load_task_model(run)
    assert task.crf is not None
    with torch.no_grad():  # transitions far from zero, so that decoding depends on them
        task.crf.transitions.normal_(0, 3.0, generator=torch.Generator().manual_seed(0))
    from lmforge.fileio import load_tensors, save_tensors

    head = load_tensors(run / "model" / "head.safetensors")
    head["crf.transitions"] = task.crf.transitions.detach().clone()
    save_tensors(head, run / "model" / "head.safetensors")
    assert main(["export", "--model", str(run), "--format", "onnx", "--output", str(tmp_path / "onnx")]) == 0
    assert (tmp_path / "onnx" / "crf.safetensors").is_file()
    assert predict_file(run, [str(held_out)], tmp_path / "torch.jsonl", progress=False) > 0
    assert predict_file(tmp_path / "onnx", [str(held_out)], tmp_path / "onnx.jsonl", progress=False) > 0
    ours = [json.loads(line) for line in (tmp_path / "torch.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (tmp_path / "onnx.jsonl").read_text().splitlines()]
    assert ours == theirs
    (tmp_path / "onnx" / "crf.safetensors").unlink()
    with pytest.raises(Exception, match="CRF"):
        load_task_model(tmp_path / "onnx")


def test_onnx_folders_evaluate_like_the_torch_model(task_runs: dict, tmp_path: Path) -> None:
    run, held_out = task_runs["classify"]
    torch_metrics = evaluate_model(run, [str(held_out)], progress=False, device="cpu")
    assert main(["export", "--model", str(run), "--format", "onnx", "--output", str(tmp_path / "onnx")]) == 0
    onnx_metrics = evaluate_model(tmp_path / "onnx", [str(held_out)], progress=False)
    assert onnx_metrics["accuracy"] == pytest.approx(torch_metrics["accuracy"])
    quantize_folder(run, "onnx-int8", tmp_path / "onnx-int8")
    int8_metrics = evaluate_model(tmp_path / "onnx-int8", [str(held_out)], progress=False)
    assert abs(int8_metrics["accuracy"] - torch_metrics["accuracy"]) <= 0.05
    assert (tmp_path / "onnx-int8" / "model.onnx").stat().st_size < (tmp_path / "onnx" / "model.onnx").stat().st_size
    assert predict_file(tmp_path / "onnx-int8", [str(held_out)], tmp_path / "p.jsonl", progress=False) > 0


@pytest.mark.parametrize("name", ["classify", "ner", "qa", "pair-score"])
def test_hf_export_opens_in_transformers_with_the_same_logits(name: str, task_runs: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoModelForTokenClassification

    run, held_out = task_runs[name]
    export_model(run, "hf", tmp_path / "hf")
    assert (tmp_path / "hf" / "lmforge_crf.safetensors").is_file() == (name == "ner")  # NER's CRF travels beside
    opener = {"classify": AutoModelForSequenceClassification, "pair-score": AutoModelForSequenceClassification,
              "ner": AutoModelForTokenClassification, "qa": AutoModelForQuestionAnswering}[name]
    theirs = opener.from_pretrained(tmp_path / "hf").eval()
    task, objective, batch = _batch(run, held_out)
    with torch.no_grad():
        expected = objective(batch, scores_only=True)
        found = hf_logits(theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 token_type_ids=batch.get("token_type_ids")), task.name)
    if found.dim() == 3:
        keep = batch["attention_mask"].bool()
        found, expected = found[keep], expected[keep]
    assert torch.allclose(found, expected, atol=1e-4)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    if name in ("classify", "ner"):
        assert list(config["id2label"].values()) == task.spec.labels


def test_what_a_format_cannot_hold_is_refused_before_writing(task_runs: dict, tiny_encoder_dir: Path,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="no model class"):
        export_model(task_runs["relation"][0], "hf", tmp_path / "relation")
    with pytest.raises(UnknownArchitectureError, match="Llama-family"):
        export_model(tiny_encoder_dir, "gguf", tmp_path / "encoder.gguf")
    assert main(["export", "--model", str(task_runs["classify"][0]), "--format", "gguf",
                 "--output", str(tmp_path / "task.gguf")]) == 2
    assert "task heads" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written, no temporary left


def test_gguf_export_reads_back_through_gguf_and_lmforge(tiny_decoder_dir: Path, tmp_path: Path) -> None:
    from gguf import GGUFReader

    model, tokenizer = load_pretrained(tiny_decoder_dir)
    export_model(tiny_decoder_dir, "gguf", tmp_path / "m.gguf", gguf_type="f32")
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert len(reader.tensors) == len(model.state_dict())
    again, again_tokenizer = load_pretrained(tmp_path / "m.gguf")
    text = "reverse: anna boris chen"
    assert again_tokenizer.encode(text) == tokenizer.encode(text)
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        assert torch.allclose(again.logits(again(ids)), model.logits(model(ids)), atol=1e-5)
    export_model(tiny_decoder_dir, "gguf", tmp_path / "q8.gguf", gguf_type="q8_0")
    q8, _ = load_pretrained(tmp_path / "q8.gguf")
    with torch.no_grad():
        close = torch.nn.functional.cosine_similarity(q8.logits(q8(ids)).flatten(), model.logits(model(ids)).flatten(), 0)
    assert close > 0.99


def test_bare_encoder_and_decoder_export_to_onnx(tiny_encoder_dir: Path, tiny_decoder_dir: Path, tmp_path: Path) -> None:
    from lmforge.deploy.onnx import run_session, session

    for folder, output in ((tiny_encoder_dir, "hidden_states"), (tiny_decoder_dir, "logits")):
        summary = export_model(folder, "onnx", tmp_path / folder.name)
        assert summary["output"] == output and summary["parity_max_abs"] <= 1e-4
        model, tokenizer = load_pretrained(folder)
        ids = torch.tensor([tokenizer.encode("reverse: anna boris"), tokenizer.encode("the film was good")[:5]
                            + [0] * (len(tokenizer.encode("reverse: anna boris")) - 5)])
        mask = (torch.arange(ids.shape[1])[None] < torch.tensor([[ids.shape[1]], [5]])).long()
        found = run_session(session(tmp_path / folder.name / "model.onnx"), summary["inputs"],
                            {"input_ids": ids, "attention_mask": mask})
        with torch.no_grad():
            hidden = model(ids, mask)
            expected = model.logits(hidden) if model.causal else hidden
        assert torch.allclose(found[mask.bool()], expected[mask.bool()], atol=1e-4)


def test_rotary_encoder_exports_to_onnx_and_roformer(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    """An encoder with rotary positions exports to ONNX (same hidden states on padded rows)
    and to a RoFormer folder that transformers opens."""
    import transformers

    from lmforge.checkpoint import save_model
    from lmforge.deploy.onnx import run_session, session
    from lmforge.models import Encoder, preset

    _, tokenizer = load_pretrained(tiny_encoder_dir)
    torch.manual_seed(0)
    model = Encoder(preset("bert-tiny", hidden_size=64, num_heads=2, intermediate_size=128,
                           vocab_size=tokenizer.vocab_size, position="rope", initializer_range=0.2)).eval()
    folder = save_model(model, tmp_path / "rope", tokenizer)
    summary = export_model(folder, "onnx", tmp_path / "onnx")
    assert summary["parity_max_abs"] <= 1e-4
    ids = torch.tensor([tokenizer.encode("the film was good and long"), tokenizer.encode("bad")
                        + [0] * (len(tokenizer.encode("the film was good and long")) - len(tokenizer.encode("bad")))])
    mask = (ids != 0).long()
    found = run_session(session(tmp_path / "onnx" / "model.onnx"), summary["inputs"],
                        {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        expected = model(ids, mask)
    assert torch.allclose(found[mask.bool()], expected[mask.bool()], atol=1e-4)
    export_model(folder, "hf", tmp_path / "hf")
    theirs = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "RoFormerModel"
    with torch.no_grad():
        hidden = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(hidden[mask.bool()], expected[mask.bool()], atol=1e-4)
    # a tagger on it is a RoFormerForTokenClassification with the same logits; a classifier is refused
    from transformers import AutoModelForTokenClassification

    from tests.tasks.conftest import ner, sentiment, write_jsonl
    from tests.tasks.helpers import finetune

    for task, make in (("ner", ner), ("classify", sentiment)):
        data = write_jsonl(tmp_path / f"{task}.jsonl", make(40, 1))
        finetune(folder, tmp_path / task, "--task", task, "--train", str(data), "--train.steps", "3")
    held_out = write_jsonl(tmp_path / "ner-test.jsonl", ner(20, 2))
    export_model(tmp_path / "ner", "hf", tmp_path / "ner-hf")
    tagger = AutoModelForTokenClassification.from_pretrained(tmp_path / "ner-hf").eval()
    assert type(tagger).__name__ == "RoFormerForTokenClassification"
    task, objective, batch = _batch(tmp_path / "ner", held_out)
    with torch.no_grad():
        expected = objective(batch, scores_only=True)
        found = hf_logits(tagger(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), "ner")
    keep = batch["attention_mask"].bool()
    assert torch.allclose(found[keep], expected[keep], atol=1e-4)
    with pytest.raises(ConfigError, match="RoFormerForSequenceClassification"):
        export_model(tmp_path / "classify", "hf", tmp_path / "classify-hf")
    assert not (tmp_path / "classify-hf").exists()

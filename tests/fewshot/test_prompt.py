"""Cloze prompts: verbalizer scores equal a hand computation on a tiny masked LM, templates and
verbalizers are checked, an encoder without an MLM head is refused clearly, and a prompt-tuned
run reloads and predicts what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import save_model
from lmforge.data.loader import pad_batch
from lmforge.errors import ConfigError
from lmforge.fewshot.prompt import ClozePrompt, PromptClassifier
from lmforge.models import preset
from lmforge.models.encoder import MaskedLM
from lmforge.tokenizer import train_wordpiece
from tests.fewshot.test_fewshot import labelled
from tests.tasks.conftest import tiny_encoder_dir  # noqa: F401  (shared fixture)

WORDS = " ".join(e["text"] for e in labelled()) + " it was good bad great terrible wonderful"


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = train_wordpiece([WORDS] * 20, vocab_size=200, show_progress=False)
    config = preset("bert-tiny", hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=tokenizer.vocab_size,
                    max_position_embeddings=64)
    torch.manual_seed(0)
    return save_model(MaskedLM(config), tmp_path_factory.mktemp("mlm") / "mlm", tokenizer)


def _load(folder: Path) -> tuple[MaskedLM, object]:
    from lmforge.checkpoint import load_pretrained

    model, tokenizer = load_pretrained(folder, with_mlm_head=True)
    return model.eval(), tokenizer


def test_verbalizer_scores_equal_a_hand_computation(tiny_mlm: Path) -> None:
    model, tokenizer = _load(tiny_mlm)
    verbalizers = {"negative": ["bad", "terrible"], "positive": ["good"]}
    prompt = ClozePrompt(tokenizer, ["negative", "positive"], verbalizers, "{text} it was [MASK] .")
    encoded = [prompt.encode(t) for t in ("a lovely film", "rude staff and slow service")]
    got = prompt.label_scores(model, pad_batch(encoded, tokenizer.pad_id or 0))
    for row, item in enumerate(encoded):
        ids = item["input_ids"]
        assert ids[item["mask_position"]] == tokenizer.backend.token_to_id("[MASK]")
        assert ids[0] == tokenizer.backend.token_to_id("[CLS]") and ids[-1] == tokenizer.backend.token_to_id("[SEP]")
        with torch.no_grad():
            hidden = model(torch.tensor([ids]))
            log_probs = F.log_softmax(model.logits(hidden[0, item["mask_position"]]), -1)
        word = {w: float(log_probs[tokenizer.backend.token_to_id(w)]) for w in ("bad", "terrible", "good")}
        by_hand = [torch.logsumexp(torch.tensor([word["bad"], word["terrible"]]), 0), torch.tensor(word["good"])]
        assert torch.allclose(got[row], torch.stack(by_hand).float(), atol=1e-5)


def test_templates_and_verbalizers_are_checked(tiny_mlm: Path) -> None:
    _, tokenizer = _load(tiny_mlm)
    with pytest.raises(ConfigError) as error:
        ClozePrompt(tokenizer, ["negative", "positive"], {"negative": ["bad"], "positive": ["good"]}, "{text} it was .")
    assert "needs exactly one [MASK] slot" in str(error.value)
    with pytest.raises(ConfigError) as error:
        ClozePrompt(tokenizer, ["negative", "positive"], {"negative": ["bad"], "positive": ["superbly"]})
    assert "verbalizer word 'superbly' (label 'positive') is 2 tokens ['superb', '##ly']; a cloze slot holds one" \
        in str(error.value)


def test_an_encoder_without_an_mlm_head_is_refused_clearly(tmp_path: Path, tiny_encoder_dir: Path) -> None:  # noqa: F811
    from lmforge.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in labelled()) + "\n")
    code = main(["finetune", "--task", "classify", "--model", str(tiny_encoder_dir), "--train", str(data),
                 "--method", "prompt", "--output", str(tmp_path / "run")])
    assert code != 0 and not (tmp_path / "run").exists()


def test_a_prompt_tuned_run_reloads_and_predicts_what_it_wrote(tmp_path: Path, tiny_mlm: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in labelled()) + "\n")
    arguments = ["finetune", "--task", "classify", "--model", str(tiny_mlm), "--train", str(data), "--test", str(data),
                 "--method", "prompt", "--template", "{text} it was [MASK] .", "--verbalizers",
                 json.dumps({"negative": ["bad"], "positive": ["good"]})]
    assert main([*arguments, "--zero-shot", "--output", str(tmp_path / "zero")]) == 0
    assert main([*arguments, "--shots", "4", "--train.steps", "20", "--train.lr", "1e-3",
                 "--output", str(tmp_path / "tuned")]) == 0
    zero = json.loads((tmp_path / "zero" / "results.json").read_text())
    tuned = json.loads((tmp_path / "tuned" / "results.json").read_text())
    assert zero["steps"] == 0 and tuned["steps"] == 20 and tuned["train_examples"] == 8
    assert tuned["test"]["accuracy"] >= zero["test"]["accuracy"]  # 20 steps on 8 of the 16 sentences
    again = PromptClassifier.load(tmp_path / "tuned" / "model")
    written = [json.loads(line) for line in (tmp_path / "tuned" / "predictions-test.jsonl").read_text().splitlines()]
    predicted = again.predict([w["text"] for w in written])
    assert [p["label"] for p in predicted] == [w["prediction"] for w in written]
    assert all(p["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5) for p, w in zip(predicted, written,
                                                                                                  strict=True))
    from lmforge.recipes.finetune import evaluate_model, predict_file

    assert evaluate_model(tmp_path / "tuned", [str(data)], progress=False) == pytest.approx(tuned["test"])
    assert predict_file(tmp_path / "tuned", [str(data)], tmp_path / "again.jsonl", progress=False) == len(written)
    again_written = [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [a["prediction"] for a in again_written] == [w["prediction"] for w in written]


def test_the_few_shot_curve_runs_cloze_prompts_on_a_masked_lm(tmp_path: Path, tiny_mlm: Path) -> None:
    from lmforge.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in labelled()) + "\n")
    assert main(["fewshot", "curve", "--task", "classify", "--train", str(data), "--test", str(data), "--methods",
                 "prompt", "finetune", "--shots", "2", "--seeds", "0", "1", "--encoder", str(tiny_mlm), "--no-references",
                 "--template", "{text} it was [MASK] .", "--verbalizers",
                 json.dumps({"negative": ["bad"], "positive": ["good"]}), "--train.steps", "3",
                 "--output", str(tmp_path / "curve")]) == 0
    curve = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert {(r["start"], r["seed"]) for r in curve["runs"]} == {(m, s) for m in ("prompt", "finetune") for s in (0, 1)}
    prompt = json.loads((tmp_path / "curve" / "runs" / "prompt-2-s1" / "results.json").read_text())
    assert prompt["method"] == "prompt" and prompt["steps"] == 3 and prompt["train_examples"] == 4
    assert "| prompt |" in (tmp_path / "curve" / "curve.md").read_text()

"""Few labels: shots drawn per label, SetFit pairs, in-context scoring against a hand
computation, contextual calibration, saved few-shot classifiers predicting the same again, and
the clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError, DataError
from lmforge.fewshot import draw_shots
from lmforge.fewshot.icl import IclClassifier, IclSettings, calibrated
from lmforge.fewshot.setfit import setfit_pairs
from tests.tasks.conftest import tiny_decoder_dir, tiny_encoder_dir  # noqa: F401  (shared fixtures)

GOOD = ["a lovely film", "great acting and a great story", "I loved every minute", "wonderful, warm and funny",
        "the best meal in town", "friendly staff and fast service", "works perfectly", "superb value"]
BAD = ["a dull film", "terrible acting", "I hated every minute", "boring and cold", "the worst meal in town",
       "rude staff and slow service", "broke after a day", "a waste of money"]


def labelled() -> list[dict[str, str]]:
    return [{"text": t, "label": "positive"} for t in GOOD] + [{"text": t, "label": "negative"} for t in BAD]


def test_shots_are_k_per_label_the_same_for_a_seed_and_refused_when_short() -> None:
    drawn = draw_shots(labelled(), 3, seed=1)
    assert sorted(e["label"] for e in drawn) == ["negative"] * 3 + ["positive"] * 3
    assert drawn == draw_shots(labelled(), 3, seed=1) and drawn != draw_shots(labelled(), 3, seed=2)
    with pytest.raises(DataError, match=r"reviews.csv: 9 shots per label were asked for, but 'negative' has 8"):
        draw_shots(labelled() + [{"text": "x", "label": "positive"}], 9, seed=1, where="reviews.csv")


def test_setfit_pairs_are_balanced_and_never_pair_an_example_with_itself() -> None:
    examples = labelled() + [{"text": "a lovely film", "label": "positive"}]  # a duplicate text
    labels, texts = [e["label"] for e in examples], [e["text"] for e in examples]
    pairs = setfit_pairs(labels, texts, iterations=5, seed=0)
    positive = [p for p in pairs if p.target == 1.0]
    negative = [p for p in pairs if p.target == 0.0]
    assert len(positive) == len(negative) == 5 * len(examples)
    assert all(p.first != p.second and texts[p.first] != texts[p.second] for p in pairs)
    assert all(labels[p.first] == labels[p.second] for p in positive)
    assert all(labels[p.first] != labels[p.second] for p in negative)
    with pytest.raises(DataError, match="two labels"):
        setfit_pairs(["a", "a"], ["x", "y"], 2, 0)


def test_calibration_divides_by_the_content_free_probabilities() -> None:
    log_p = torch.tensor([[0.6, 0.4]]).log()
    p_cf = torch.tensor([0.7, 0.3])  # the prompt leans to label 0 whatever the text
    out = calibrated(log_p, p_cf).exp()
    by_hand = torch.tensor([0.6 / 0.7, 0.4 / 0.3])
    assert torch.allclose(out[0], by_hand / by_hand.sum(), atol=1e-6)
    assert int(log_p.argmax()) == 0 and int(out.argmax()) == 1  # the decision changes as the formula says
    assert torch.allclose(calibrated(log_p, torch.tensor([0.5, 0.5])).exp(), log_p.exp(), atol=1e-6)


def test_biases_fitted_to_labelled_shots_are_the_maximum_likelihood_correction(
        monkeypatch: pytest.MonkeyPatch, tiny_decoder_dir: Path) -> None:  # noqa: F811
    model, tokenizer = _decoder(tiny_decoder_dir)
    classifier = IclClassifier(model, tokenizer, IclSettings(["negative", "positive"],
                                                             {"negative": ["bad"], "positive": ["good"]}))
    # the prompt leans to "positive" whatever the text: the gap between the classes sits at +1.2
    margins = torch.tensor([-1.0, -0.5, 0.0, 0.4, 2.0, 2.5, 3.0, 3.4])
    log_p = torch.stack([torch.zeros(8), margins], 1).log_softmax(-1)
    gold = ["negative"] * 4 + ["positive"] * 4
    monkeypatch.setattr(classifier, "log_probs", lambda texts: log_p[:len(texts)])
    assert [int(i) for i in log_p.argmax(1)] == [0, 0, 0, 1, 1, 1, 1, 1]  # one negative shot reads positive
    p_cf = torch.tensor(classifier.calibrate_on([f"t{i}" for i in range(8)], gold, l2=0.0))
    assert classifier.settings.calibrated_on == "8 labelled shots" and p_cf[1] > p_cf[0]
    corrected = calibrated(log_p, p_cf)
    assert [int(i) for i in corrected.argmax(1)] == [0, 0, 0, 0, 1, 1, 1, 1]  # the shots now read right
    # the fit is the maximum-likelihood bias: the gradient of the loss vanishes there
    bias = (-p_cf.log()).requires_grad_(True)
    F.cross_entropy(log_p + bias, torch.tensor([0] * 4 + [1] * 4)).backward()
    assert bias.grad is not None and bias.grad.abs().max() < 1e-3
    with pytest.raises(ConfigError, match="'neutral'"):
        classifier.calibrate_on(["x"], ["neutral"])


def _decoder(folder: Path) -> tuple[torch.nn.Module, object]:
    from lmforge.checkpoint import load_pretrained

    model, tokenizer = load_pretrained(folder)
    return model.eval(), tokenizer


def test_in_context_scores_equal_a_hand_computation_with_multi_token_words(tiny_decoder_dir: Path) -> None:  # noqa: F811
    model, tokenizer = _decoder(tiny_decoder_dir)
    verbalizers = {"negative": [" awful", " not good at all"], "positive": [" superb and wonderful"]}
    settings = IclSettings(["negative", "positive"], verbalizers, "Text: {text}\nAnswer:", "Judge each text.",
                           [{"text": "a dull film", "label": "negative"}])
    classifier = IclClassifier(model, tokenizer, settings, batch_size=3)
    assert max(len(w) for ws in classifier.words.values() for w in ws) > 1  # multi-token words are there
    texts = ["great acting", "rude staff and slow service"]
    got = classifier.log_probs(texts)

    def word_score(prompt: str, word: str) -> float:
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        word_ids = tokenizer.encode(word, add_special_tokens=False)
        ids = torch.tensor([prompt_ids + word_ids])
        with torch.no_grad():
            log_probs = F.log_softmax(model.logits(model(ids))[0].float(), -1)
        return float(sum(log_probs[len(prompt_ids) - 1 + i, t] for i, t in enumerate(word_ids)))

    for row, text in enumerate(texts):
        prompt = "Judge each text.\n\nText: a dull film\nAnswer: awful\n\nText: " + text + "\nAnswer:"
        assert classifier.prompt(text) == prompt
        raw = torch.tensor([torch.logsumexp(torch.tensor([word_score(prompt, w) for w in verbalizers[label]]), 0)
                            for label in ("negative", "positive")])
        assert torch.allclose(got[row], raw - torch.logsumexp(raw, 0), atol=1e-4)


def test_one_token_words_are_scored_in_one_pass_as_the_general_path_scores_them(
        tiny_decoder_dir: Path) -> None:  # noqa: F811
    model, tokenizer = _decoder(tiny_decoder_dir)
    single = [w for w in ("a", "the", "and", "of", "to", "is", "it", "in", "I") if len(tokenizer.encode(
        " " + w, add_special_tokens=False)) == 1]
    assert len(single) >= 4, single
    settings = IclSettings(["negative", "positive", "neutral"], {"negative": single[:2], "positive": [single[2]],
                                                                 "neutral": [single[3]]},
                           demonstrations=[{"text": "a dull film", "label": "negative"}])
    classifier = IclClassifier(model, tokenizer, settings, batch_size=3)
    assert all(len(ids) == 1 for words in classifier.words.values() for ids in words)
    texts = ["a lovely film", "terrible acting and a waste of money", "ok", "I loved every minute of it"]
    fast = classifier.log_probs(texts)
    assert torch.allclose(fast, classifier._sequence_log_probs(texts), atol=1e-5)
    assert torch.allclose(fast.exp().sum(-1), torch.ones(len(texts)), atol=1e-5)


def test_a_saved_in_context_classifier_reloads_and_predicts_the_same(tmp_path: Path,
                                                                     tiny_decoder_dir: Path) -> None:  # noqa: F811
    model, tokenizer = _decoder(tiny_decoder_dir)
    settings = IclSettings(["negative", "positive"], {"negative": ["bad"], "positive": ["good"]})
    classifier = IclClassifier(model, tokenizer, settings)
    p_cf = classifier.calibrate()
    assert len(p_cf) == 2 and abs(sum(p_cf) - 1) < 1e-6
    classifier.save(tmp_path / "icl", tiny_decoder_dir)
    again = IclClassifier.load(tmp_path / "icl")
    texts = ["a lovely film", "a waste of money"]
    assert again.settings.calibration == p_cf
    assert again.predict(texts) == classifier.predict(texts)


def test_evaluate_and_predict_take_an_in_context_run_with_its_own_field_names(tmp_path: Path,
                                                                             tiny_decoder_dir: Path) -> None:  # noqa: F811
    from lmforge.errors import CorruptFileError
    from lmforge.recipes.finetune import evaluate_model, predict_file
    from lmforge.tasks.loading import load_task_model

    data = tmp_path / "reviews.jsonl"
    data.write_text("\n".join(json.dumps({"review": e["text"], "stars": e["label"]}) for e in labelled()) + "\n")
    unlabelled = tmp_path / "new.jsonl"
    unlabelled.write_text("\n".join(json.dumps({"review": e["text"]}) for e in labelled()[::2]) + "\n")
    assert _finetune("--model", str(tiny_decoder_dir), "--train", str(data), "--test", str(data), "--method", "icl",
                     "--text-field", "review", "--label-field", "stars", "--calibrate", "--shots", "2",
                     "--demonstrations", "1", "--output", str(tmp_path / "run")) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert evaluate_model(tmp_path / "run", [str(data)], progress=False) == pytest.approx(results["test"])
    written = [json.loads(line) for line in (tmp_path / "run" / "predictions-test.jsonl").read_text().splitlines()]
    assert predict_file(tmp_path / "run", [str(unlabelled)], tmp_path / "out.jsonl", progress=False) == 8
    again = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [a["text"] for a in again] == [w["text"] for w in written[::2]]  # read from "review"
    assert [a["prediction"] for a in again] == [w["prediction"] for w in written[::2]]
    with pytest.raises(CorruptFileError, match="in-context or cloze-prompt classifier"):
        load_task_model(tmp_path / "run")  # serve / quantise need a fine-tuned folder: said so


def test_bad_few_shot_settings_are_clear_errors(tiny_decoder_dir: Path) -> None:  # noqa: F811
    model, tokenizer = _decoder(tiny_decoder_dir)
    with pytest.raises(ConfigError) as error:
        IclClassifier(model, tokenizer, IclSettings(["negative", "positive"], {"negative": ["bad"], "neutral": ["meh"]},
                                                    template="Review:"))
    text = str(error.value)
    assert "has no {text} slot" in text and "label 'positive' has no verbalizer" in text and "'neutral'" in text


def _finetune(*args: str) -> int:
    from lmforge.cli import main

    return main(["finetune", "--task", "classify", *args])


def test_setfit_run_reloads_and_predicts_what_it_wrote(tmp_path: Path, tiny_encoder_dir: Path) -> None:  # noqa: F811
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in labelled()) + "\n")
    test = tmp_path / "test.jsonl"
    test.write_text("\n".join(json.dumps(e) for e in labelled()[::3]) + "\n")
    assert _finetune("--model", str(tiny_encoder_dir), "--train", str(data), "--test", str(test), "--method", "setfit",
                     "--shots", "4", "--setfit-iterations", "2", "--output", str(tmp_path / "run")) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "setfit" and results["train_examples"] == 8 and results["pairs"] == 32
    written = [json.loads(line) for line in (tmp_path / "run" / "predictions-test.jsonl").read_text().splitlines()]
    from lmforge.recipes.finetune import evaluate_model, predict_file

    predict_file(tmp_path / "run", [str(test)], tmp_path / "again.jsonl", progress=False)
    again = [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [w["prediction"] for w in written] == [a["prediction"] for a in again]
    assert all(w["probabilities"] == pytest.approx(a["probabilities"], abs=1e-5) for w, a in zip(written, again,
                                                                                                 strict=True))
    assert evaluate_model(tmp_path / "run", [str(test)], progress=False)["accuracy"] == results["test"]["accuracy"]


def test_more_shots_than_examples_is_refused_before_the_run_folder_is_made(tmp_path: Path,
                                                                            tiny_encoder_dir: Path) -> None:  # noqa: F811
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in labelled()) + "\n")
    from lmforge.cli import main

    code = main(["finetune", "--task", "classify", "--model", str(tiny_encoder_dir), "--train", str(data),
                 "--shots", "20", "--output", str(tmp_path / "run")])
    assert code != 0 and not (tmp_path / "run").exists()


def test_the_few_shot_curve_runs_every_method_and_keeps_finished_runs(tmp_path: Path, tiny_encoder_dir: Path,  # noqa: F811
                                                                      tiny_decoder_dir: Path) -> None:  # noqa: F811
    from lmforge.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in labelled()) + "\n")
    arguments = ["fewshot", "curve", "--task", "classify", "--train", str(data), "--test", str(data), "--methods",
                 "finetune", "setfit", "icl", "--shots", "2", "4", "--seeds", "0", "--encoder", str(tiny_encoder_dir),
                 "--decoder", str(tiny_decoder_dir), "--demonstrations", "1", "--setfit-iterations", "1",
                 "--train.steps", "2", "--output", str(tmp_path / "curve")]
    assert main(arguments) == 0
    curve = json.loads((tmp_path / "curve" / "curve.json").read_text())
    cells = {(r["start"], r["labels"]) for r in curve["runs"]}
    assert cells == {(m, n) for m in ("finetune", "setfit", "icl") for n in (4, 8)}
    icl = json.loads((tmp_path / "curve" / "runs" / "icl-2-s0" / "results.json").read_text())
    assert icl["method"] == "icl" and icl["demonstrations"] == 2
    assert icl["calibrated_on"] == "2 labelled shots"  # by default, on the shots not shown in the prompt
    zero = json.loads((tmp_path / "curve" / "references" / "runs" / "icl zero-shot-all-s0" / "results.json").read_text())
    assert zero["calibrated_on"] is None  # no shots, no calibration unless asked for
    references = json.loads((tmp_path / "curve" / "references" / "curve.json").read_text())
    assert {r["start"]: r["labels"] for r in references["runs"]} == {"ceiling (all labels)": 16, "icl zero-shot": 16}
    table = (tmp_path / "curve" / "curve.md").read_text()
    assert "| setfit |" in table and "| icl |" in table and (tmp_path / "curve" / "curve.png").exists()
    finished = (tmp_path / "curve" / "runs" / "setfit-4-s0" / "results.json").stat().st_mtime_ns
    assert main(arguments) == 0  # a second call reads the finished runs
    assert (tmp_path / "curve" / "runs" / "setfit-4-s0" / "results.json").stat().st_mtime_ns == finished

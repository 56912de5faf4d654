"""Generation fine-tuning: loss only on targets / assistant turns, perplexity falls,
generation metrics are computed on generated text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.loader import IGNORE_INDEX
from lmforge.errors import DataError
from lmforge.eval.metrics import generation_metrics
from lmforge.tasks import TaskSpec, make_task
from lmforge.tokenizer import Tokenizer
from tests.tasks.conftest import translation, write_jsonl
from tests.tasks.helpers import finetune

FIELDS = {"prompt": "prompt", "target": "target", "messages": "messages"}


def test_prompt_tokens_carry_no_loss(tiny_decoder_dir: Path) -> None:
    tokenizer = Tokenizer.load(tiny_decoder_dir)
    task = make_task(TaskSpec("generate", FIELDS, [], {"chat": False}), tokenizer)
    (feature,) = task.encode({"prompt": "reverse: anna chen", "target": "chen anna", "_source": "x:1"})
    prompt = tokenizer.encode("reverse: anna chen")
    target = tokenizer.encode("chen anna", add_special_tokens=False)
    assert feature["input_ids"] == prompt + target + [tokenizer.eos_id]
    assert feature["labels"] == [IGNORE_INDEX] * len(prompt) + target + [tokenizer.eos_id]


def test_dialogue_loss_covers_assistant_turns_only(tiny_decoder_dir: Path) -> None:
    tokenizer = Tokenizer.load(tiny_decoder_dir)
    task = make_task(TaskSpec("generate", FIELDS, []), tokenizer)
    messages = [{"role": "user", "content": "hi anna"}, {"role": "assistant", "content": "hello boris"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]
    (feature,) = task.encode({"messages": messages, "_source": "x:1"})
    learned = tokenizer.decode([t for t, label in zip(feature["input_ids"], feature["labels"], strict=True)
                                if label != IGNORE_INDEX], skip_special_tokens=False)
    assert learned.split() == ["hello", "boris", "see", "you"] and learned.endswith("\n")
    assert "anna" not in learned and "assistant" not in learned
    assert task.prompt_text({"messages": messages}).endswith("bye\n<|endoftext|>assistant: ")
    assert task.reference({"messages": messages}) == "see you"


def test_generation_metrics_known_answers() -> None:
    same = ["the cat sat on the mat today", "a dog ran in the park at night"]
    metrics = generation_metrics(same, same)
    assert metrics["bleu"] == pytest.approx(100.0) and metrics["chrf"] == pytest.approx(100.0)
    assert metrics["rougeL"] == pytest.approx(1.0)
    assert generation_metrics(["北京欢迎你"], ["北京欢迎您"])["rougeL"] == pytest.approx(0.8)


def test_generation_finetuning_lowers_perplexity(tiny_decoder_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", translation(300, 1))
    validation = write_jsonl(tmp_path / "validation.jsonl", translation(40, 2))
    results = finetune(tiny_decoder_dir, tmp_path / "run", "--task", "generate", "--train", str(train),
                       "--validation", str(validation), "--chat", "false", "--eval-before", "--eval-generate", "8",
                       "--max-new-tokens", "8", epochs=4)
    before, after = results["before"], results["validation"]
    assert after["perplexity"] < before["perplexity"] / 3, (before, after)
    assert {"bleu", "chrf", "rougeL"} <= set(after) and after["generated"] == 8
    predictions = [json.loads(line) for line in (tmp_path / "run" / "predictions-validation.jsonl").read_text()
                   .splitlines()]
    assert "generated" in predictions[0] and "target" in predictions[0]  # the reference is kept beside the output


def test_encoder_for_generation_is_refused(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", translation(20, 1))
    with pytest.raises(DataError, match="needs a decoder"):
        finetune(tiny_encoder_dir, tmp_path / "run", "--task", "generate", "--train", str(train), "--chat", "false")


def test_instruction_text_with_a_colon_stays_text(tiny_decoder_dir: Path) -> None:
    from lmforge.recipes.finetune import load_config

    config = load_config(None, ["--task", "generate", "--model", str(tiny_decoder_dir), "--train", "x.jsonl",
                                "--instruction", "Translate into Chinese: "])
    assert config["finetune"].instruction == "Translate into Chinese: "

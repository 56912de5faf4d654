"""`lmforge finetune --peft ...`: the task head trains with the adapter, base weights stay
as they were, the adapter file is small, and the task model reloads with identical
predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_model
from lmforge.peft import load_adapter
from lmforge.recipes.finetune import load_task_model
from tests.tasks.conftest import sentiment, write_jsonl
from tests.tasks.helpers import finetune


@pytest.mark.parametrize("method", ["lora", "adalora", "prompt"])
def test_finetune_with_peft(tiny_encoder_dir: Path, tmp_path: Path, method: str) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", sentiment(320, 1))
    validation = write_jsonl(tmp_path / "validation.jsonl", sentiment(100, 2))
    results = finetune(tiny_encoder_dir, tmp_path / "run", "--task", "classify", "--train", str(train),
                       "--validation", str(validation), "--peft", method, "--peft.r", "4", "--peft.init_r", "6",
                       "--peft.target_r", "2", "--peft.targets", '["attention.query", "attention.value", "intermediate"]'
                       if method != "prompt" else "[]", "--peft.tinit", "30", "--peft.tfinal", "30",
                       "--pooling", "mean", "--train.lr", "5e-3", epochs=6)
    # the backbone is random and frozen: learning comes from the adapter and the head alone
    assert results["validation"]["accuracy"] > 0.65, results  # majority class: 0.53
    share = results["parameters"]["trainable_share"]
    assert 0 < share < 0.25
    assert results["adapter_bytes"] < 0.2 * (tmp_path / "run" / "model" / "model.safetensors").stat().st_size
    if method == "adalora":
        assert sum(results["adalora_ranks"].values()) == 2 * len(results["adalora_ranks"])
    base = load_model(tiny_encoder_dir)
    task, objective = load_task_model(tmp_path / "run")
    tuned = objective.model.state_dict()
    for name, value in base.state_dict().items():
        assert torch.equal(tuned[name], value), name  # the backbone's own weights never moved
    # the adapter folder alone, on the base model, gives the fine-tuned backbone
    fresh = load_model(tiny_encoder_dir)
    load_adapter(fresh, tmp_path / "run" / "model" / "adapter")
    ids = torch.tensor([task.tokenizer.encode("a good film")])
    assert torch.allclose(fresh(ids), objective.model(ids), atol=1e-6)
    meta = json.loads((tmp_path / "run" / "model" / "adapter" / "adapter_config.json").read_text())
    assert meta["peft"]["method"] == method and meta["task"]["labels"] == ["neg", "pos"]


def test_each_method_has_its_own_default_learning_rate_and_lora_covers_every_linear_layer() -> None:
    from lmforge.models import Decoder, Encoder, preset
    from lmforge.peft import PeftSection, apply_peft
    from lmforge.peft.core import DEFAULT_LR
    from lmforge.recipes.finetune import load_config

    base = ["--task", "classify", "--model", "m", "--train", "x.jsonl"]
    assert load_config(None, base)["train"].lr == 5e-5  # full fine-tuning
    for method, lr in DEFAULT_LR.items():
        assert load_config(None, [*base, "--peft", method])["train"].lr == lr
    assert DEFAULT_LR["lora"] >= 20 * 5e-5  # fresh low-rank factors do not move at full fine-tuning's rate
    assert load_config(None, [*base, "--peft", "lora", "--train.lr", "1e-4"])["train"].lr == 1e-4  # given: kept
    for model, per_layer in ((Encoder(preset("bert-tiny", vocab_size=50)), 6), (Decoder(preset("llama-tiny", vocab_size=50)), 7),
                             (Decoder(preset("gpt2-tiny", vocab_size=50)), 6)):
        layers = len(model.layers)
        apply_peft(model, PeftSection(method="lora"))
        wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_a") or type(m).__name__ == "LoraLinear"]
        assert len(wrapped) == per_layer * layers, wrapped

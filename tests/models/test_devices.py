"""Every tensor made inside a forward pass, a loss, generation or an adapter lands on its
inputs' device. With the default device set to ``meta`` while model and inputs stay on the
CPU, a factory call without ``device=`` makes a meta tensor and the maths fails: so these
tests catch what would break on a GPU, on a machine without one. On a GPU machine,
``LMFORGE_TEST_DEVICE=cuda`` runs the same tests with model and inputs on the GPU (the
GPU check does)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from lmforge.generation import GenerationConfig, generate_tokens
from lmforge.hardware import to_device
from lmforge.models import Decoder, MaskedLM, preset
from lmforge.objectives import CausalLMObjective, MaskedLMObjective, MaskingConfig
from lmforge.objectives.mlm import masked_lm_loss_sum
from lmforge.peft import AdaLoraController, PeftSection, apply_peft
from lmforge.tasks.base import pool

DEVICE = torch.device(os.environ.get("LMFORGE_TEST_DEVICE", "cpu"))


@pytest.fixture
def meta_default() -> Iterator[None]:
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _decoder(name: str) -> Decoder:
    return Decoder(preset(name, vocab_size=97, max_position_embeddings=64)).eval()  # type: ignore[arg-type]


def _inputs(batch: int = 2, length: int = 9, vocab: int = 97) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :3] = 0  # left padding on one row
    return ids.to(DEVICE), mask.to(DEVICE)


def _check(tensor: torch.Tensor) -> None:
    assert tensor.device.type == DEVICE.type and torch.isfinite(tensor.float()).all()


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_encoder_objective_and_heads_stay_on_the_input_device(position: str) -> None:
    torch.manual_seed(0)
    model = MaskedLM(preset("bert-tiny", vocab_size=97, add_pooler=True, position=position))  # type: ignore[arg-type]
    objective = MaskedLMObjective(model, 3, [0, 1, 2, 3], MaskingConfig(rate=0.3), "sop").to(DEVICE)
    ids, mask = (t.cpu() for t in _inputs())
    ids[:, 0] = 2
    batch, _ = objective.prepare({"input_ids": ids, "attention_mask": mask, "pair_labels": torch.tensor([0, 1])},
                                 [torch.Generator().manual_seed(r) for r in range(2)])
    batch = to_device(batch, DEVICE)
    weights = torch.tensor([1.0, 2.0, 0.5], device=DEVICE)
    torch.set_default_device("meta")
    try:
        out = objective(batch)
        loss = sum(out.loss_sums.values())
        loss.backward()  # type: ignore[union-attr]
        hidden = model(batch["input_ids"], batch["attention_mask"])
        for how in ("cls", "pooler", "mean", "last"):
            _check(pool(model.encoder, hidden, batch["attention_mask"], how))
        _check(pool(model.encoder, hidden, None, "mean"))
        labels = torch.tensor([0, 2], device=DEVICE)
        _check(F.cross_entropy(hidden[:, 0, :3], labels, weight=weights))
        _check(masked_lm_loss_sum(model, hidden, batch["labels"])[0])
    finally:
        torch.set_default_device(None)
    _check(loss)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_decoder_loss_and_generation_stay_on_the_input_device(name: str, meta_default: None) -> None:
    torch.set_default_device(None)
    torch.manual_seed(0)
    model = _decoder(name).to(DEVICE)
    objective = CausalLMObjective(model, separator_id=5, document_mask=True, chunk_rows=7)
    ids, mask = _inputs()
    torch.set_default_device("meta")
    batch, _ = objective.prepare({"input_ids": ids}, [])
    batch = to_device(batch, DEVICE)
    out = objective(batch)
    out.loss_sums["clm"].backward()
    _check(out.loss_sums["clm"])
    for config in (GenerationConfig(max_new_tokens=4, stop_token_ids=[7]),
                   GenerationConfig(max_new_tokens=4, do_sample=True, top_k=5, top_p=0.9, temperature=0.8,
                                    repetition_penalty=1.2, seed=3)):
        tokens = list(generate_tokens(model, ids, config, mask, pad_id=0))
        assert len(tokens) >= 1 and all(t.device.type == DEVICE.type for t in tokens)


@pytest.mark.parametrize("method", ["lora", "adalora", "adapter", "ia3", "prefix", "prompt", "bitfit"])
def test_adapters_stay_on_the_input_device(method: str) -> None:
    torch.manual_seed(0)
    model = _decoder("gpt2-tiny").train()
    apply_peft(model, PeftSection(method=method, r=4, init_r=4, target_r=2))  # type: ignore[arg-type]
    controller = AdaLoraController(model, 10, 4, 2, 1, 2, 1, 0.85, 0.85, orth_reg=0.1) if method == "adalora" else None
    model.to(DEVICE)
    objective = CausalLMObjective(model)
    ids, mask = _inputs()
    batch, _ = objective.prepare({"input_ids": ids, "attention_mask": mask}, [])
    batch = to_device(batch, DEVICE)
    torch.set_default_device("meta")
    try:
        out = objective(batch)
        out.loss_sums["clm"].backward()
        if controller is not None:
            controller.before_step(1)
            controller.after_step(2)
        model.eval()
        tokens = list(generate_tokens(model, ids, GenerationConfig(max_new_tokens=3), mask, pad_id=0))
    finally:
        torch.set_default_device(None)
    _check(out.loss_sums["clm"])
    assert all(t.device.type == DEVICE.type for t in tokens)

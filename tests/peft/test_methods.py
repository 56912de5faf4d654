"""Every method against toy encoders and decoders: only adapter parameters learn, base
weights stay bit-identical, adapter files round-trip, merged == unmerged, AdaLoRA meets
its budget, bad targets are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models import Decoder, Encoder, preset
from lmforge.peft import (
    AdaLoraController,
    AdapterBank,
    PeftSection,
    apply_peft,
    load_adapter,
    merge,
    save_adapter,
    unmerge,
)

METHODS = ["lora", "adalora", "adapter", "prefix", "prompt", "bitfit", "ia3"]


def toy(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "encoder":
        return Encoder(preset("bert-tiny", hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=50,
                              max_position_embeddings=64))
    name = "gpt2-tiny" if family == "gpt2" else "llama-tiny"
    return Decoder(preset(name, hidden_size=32, num_heads=4, **({"num_kv_heads": 2} if name == "llama-tiny" else {}),
                          intermediate_size=64, vocab_size=50, max_position_embeddings=64))


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 50, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run(model: nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(data["input_ids"], data["attention_mask"])


@pytest.mark.parametrize("family", ["encoder", "llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_method_matrix(family: str, method: str, tmp_path: Path) -> None:
    model = toy(family).eval()  # no dropout: outputs compare exactly
    data = batch()
    before = run(model, data).detach()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    if method == "bitfit" and family == "llama":
        with pytest.raises(ConfigError, match="no bias parameters"):
            apply_peft(model, PeftSection(method=method))
        return
    info = apply_peft(model, PeftSection(method=method, r=4, init_r=4, target_r=2, prefix_length=3, prompt_length=3,
                                         adapter_size=8, dropout=0.0))
    assert 0 < info["trainable"] < info["total"]
    start = run(model, data).detach()
    if method in ("lora", "adalora", "adapter", "ia3"):  # these start as the base model
        assert torch.allclose(start, before, atol=1e-6)
    assert start.shape == before.shape  # prompts are stripped from the outputs
    head = nn.Linear(32, 2)
    trainable = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        hidden = run(model, data)
        loss = head(hidden).pow(2).mean()
        loss.backward()
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                assert parameter.grad is None, name  # frozen weights get no gradient
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    for name, value in base.items():
        if method == "bitfit" and name.endswith(".bias"):
            continue
        assert torch.equal(after[name], value), name  # base weights bit-identical
    model.eval()
    trained = run(model, data).detach()
    assert not torch.allclose(trained, start)
    save_adapter(model, tmp_path / "adapter")
    files = sum(f.stat().st_size for f in (tmp_path / "adapter").glob("adapter.*"))
    assert files < 0.5 * sum(v.numel() * 4 for v in base.values())
    fresh = toy(family).eval()
    load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    assert torch.allclose(run(fresh, data), trained, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_merged_equals_unmerged(method: str) -> None:
    model = toy("llama")
    apply_peft(model, PeftSection(method=method, r=4, dropout=0.0))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    data = batch()
    model.eval()
    unmerged = run(model, data)
    assert merge(model) > 0
    assert torch.allclose(run(model, data), unmerged, atol=1e-5)
    unmerge(model)
    assert torch.allclose(run(model, data), unmerged, atol=1e-5)


def test_prefix_with_kv_cache_equals_recompute() -> None:
    model = toy("llama")
    apply_peft(model, PeftSection(method="prefix", prefix_length=3))
    model.eval()
    ids = batch()["input_ids"][:1]
    with torch.no_grad():
        full = model.logits(model(ids))
        cache = model.new_cache(1, 16)
        first = model.logits(model(ids[:, :6], cache=cache))
        rest = [model.logits(model(ids[:, t : t + 1], cache=cache)) for t in range(6, 10)]
    assert torch.allclose(torch.cat([first, *rest], 1), full, atol=1e-5)


def test_adalora_reaches_its_budget() -> None:
    model = toy("encoder")
    apply_peft(model, PeftSection(method="adalora", init_r=6, target_r=2, dropout=0.0))
    controller = AdaLoraController(model, total_steps=20, init_r=6, target_r=2, tinit=2, tfinal=4, delta_t=1,
                                   beta1=0.85, beta2=0.85, orth_reg=0.1)
    layers = len(controller.layers)
    assert controller.budget(0) == 6 * layers and controller.budget(20) == 2 * layers
    head = nn.Linear(32, 2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + list(head.parameters()), lr=1e-2)
    data = batch()
    for step in range(20):
        head(run(model, data)).pow(2).mean().backward()
        controller.before_step(step)
        optimizer.step()
        optimizer.zero_grad()
        controller.after_step(step + 1)
    ranks = controller.ranks()
    assert sum(ranks.values()) == 2 * layers  # the budget, spread over layers by importance
    for layer in controller.layers.values():  # pruned singular values are exactly zero
        assert torch.all(layer.lora_E[layer.lora_rank_mask == 0] == 0)


def test_unknown_targets_are_listed() -> None:
    with pytest.raises(ConfigError, match=r"peft targets not found: q_proj, nothing; linear layers here: .*"
                                          r"layers\.\{i\}\.attention\.query"):
        apply_peft(toy("encoder"), PeftSection(method="lora", targets=["q_proj", "nothing", "attention.key"]))


def test_adapters_switch_at_inference(tmp_path: Path) -> None:
    data = batch()
    outputs = {}
    for name, seed in (("a", 1), ("b", 2)):
        model = toy("encoder")
        apply_peft(model, PeftSection(method="lora", r=4))
        torch.manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn_like(parameter) * 0.1)
        model.eval()
        outputs[name] = run(model, data)
        save_adapter(model, tmp_path / name)
    served = toy("encoder").eval()
    bank = AdapterBank(served)
    bank.load("a", tmp_path / "a")
    bank.load("b", tmp_path / "b")
    assert torch.allclose(run(served, data), outputs["b"], atol=1e-6)
    bank.use("a")
    assert torch.allclose(run(served, data), outputs["a"], atol=1e-6)


def test_adalora_scores_survive_a_checkpoint() -> None:
    model = toy("encoder")
    apply_peft(model, PeftSection(method="adalora", init_r=4, target_r=2))
    controller = AdaLoraController(model, 10, 4, 2, 0, 0, 1, 0.85, 0.85, 0.1)
    head = nn.Linear(32, 2)
    head(run(model, batch())).pow(2).mean().backward()
    controller.before_step(0)
    saved = controller.state_dict()
    again = AdaLoraController(model, 10, 4, 2, 0, 0, 1, 0.85, 0.85, 0.1)
    again.load_state_dict(saved)
    for name, scores in controller.triplet_scores().items():
        assert torch.equal(again.triplet_scores()[name], scores)

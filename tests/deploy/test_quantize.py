"""Quantised models stay close to fp32, round-trip through their folders, run in
evaluate/predict/generate, take LoRA on a frozen base, and refuse to be quantised twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_model, load_pretrained, save_model
from lmforge.cli import main
from lmforge.deploy import quantize_folder as quantize
from lmforge.deploy.quantize import QuantizedLinear, quantize_groups_int4, quantize_model, unpack_int4
from lmforge.errors import ConfigError
from lmforge.peft import PeftSection, apply_peft
from lmforge.recipes.finetune import evaluate_model, predict_file


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Weights with the spread of a trained model (a random init is nearly all noise)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_quantised_outputs_stay_close_and_round_trip(which: str, method: str, tiny_encoder_dir: Path,
                                                     tiny_decoder_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_pretrained(tiny_encoder_dir if which == "encoder" else tiny_decoder_dir)
    model = _trained_like(model).eval()
    ids = torch.tensor([tokenizer.encode("the film was good and the staff lovely in paris")] * 2)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with torch.no_grad():
        reference = model(ids, mask)
        spec = quantize_model(model, method, group_size=16)
        quantised = model(ids, mask)
    real = mask.bool()
    assert _cosine(quantised[real], reference[real]) >= 0.99
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert set(spec["linear"]) and spec["embeddings"]
    model.quantization = spec
    save_model(model, tmp_path / "q", tokenizer)
    again = load_model(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(ids, mask), quantised)  # the folder holds exactly what ran
    stored = sum(p.stat().st_size for p in (tmp_path / "q").iterdir())
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["method"] == method
    fp32 = sum(p.stat().st_size for p in (tiny_encoder_dir if which == "encoder" else tiny_decoder_dir).iterdir())
    assert stored < fp32  # tokenizer files are shared; the weights shrink


def test_int4_packing_round_trips_exactly() -> None:
    weight = torch.randn(8, 64)
    packed, scale, low = quantize_groups_int4(weight, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 32)
    q = unpack_int4(packed)
    assert int(q.max()) <= 15
    rebuilt = (q.float().reshape(8, 2, 32) * scale.float()[..., None] + low.float()[..., None]).reshape(8, 64)
    plain = (weight.reshape(8, 2, 32).amax(-1) - weight.reshape(8, 2, 32).amin(-1)) / 15
    assert (rebuilt - weight).pow(2).mean() <= (plain ** 2).mean() / 12 * 1.05  # no worse than the plain min-max grid


@pytest.mark.parametrize("kernel", ["fbgemm", "onednn", "int8pack"])
def test_every_int8_kernel_computes_the_same_product(kernel: str) -> None:
    linear = torch.nn.Linear(64, 48)
    layer = QuantizedLinear.from_linear(linear, 8, None, dynamic=kernel != "int8pack")
    x = torch.randn(5, 64)
    layer.prepare("dequant")
    exact = layer(x)
    try:
        layer.prepare(kernel)
        fast = layer(x)
    except (RuntimeError, NotImplementedError, AttributeError):
        pytest.skip(f"this torch build has no {kernel} kernel")  # the probe then never picks it
    assert _cosine(fast, exact) > 0.999


def test_large_and_small_inputs_take_their_own_kernels_and_padding_changes_nothing() -> None:
    from lmforge.deploy.quantize import SMALL_BELOW, _dynamic_engines

    missing = {"fbgemm", "onednn"} - set(_dynamic_engines())
    if missing:  # e.g. torch's ARM builds have no fbgemm; the kernel probe then never offers it
        pytest.skip(f"this torch build has no {' or '.join(sorted(missing))} dynamic int8 engine to pair")
    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 48), 8, None, dynamic=True)
    layer.prepare("dequant")
    small, large = torch.randn(2, 3, 64), torch.randn(SMALL_BELOW + 9, 64)  # 201 rows: padded to 256
    exact_small, exact_large = layer(small), layer(large)
    layer.prepare("onednn", "fbgemm")
    assert "fbgemm below" in repr(layer)
    assert _cosine(layer(small), exact_small) > 0.999 and _cosine(layer(large), exact_large) > 0.999
    unpadded = torch.ops.quantized.linear_dynamic(large, layer.runtime, True)  # oneDNN on the 201 rows as they are
    assert torch.equal(layer(large), unpadded)
    layer.float()  # a cast rebuilds the runtime forms and keeps both choices
    assert (layer.kernel, layer.small_kernel) == ("onednn", "fbgemm")


def test_int4pack_kernel_matches_dequantised_weights() -> None:
    linear = torch.nn.Linear(64, 32, bias=False)
    layer = QuantizedLinear.from_linear(linear, 4, 32)
    x = torch.randn(3, 64)
    layer.prepare("dequant")
    exact = layer(x)
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("no int4 CPU kernel in this torch build")
    layer.prepare("int4pack")
    assert torch.allclose(layer(x), exact, atol=1e-3)


def test_quantised_task_model_evaluates_and_predicts(task_runs: dict, tmp_path: Path) -> None:
    run, held_out = task_runs["classify"]
    fp32 = evaluate_model(run, [str(held_out)], progress=False, device="cpu")
    summary = quantize(run, "int8", tmp_path / "int8")
    assert summary["megabytes"] < summary["source_megabytes"]
    int8 = evaluate_model(tmp_path / "int8", [str(held_out)], progress=False, device="cpu")
    assert abs(int8["accuracy"] - fp32["accuracy"]) <= 0.05
    assert predict_file(tmp_path / "int8", [str(held_out)], tmp_path / "p.jsonl", progress=False) > 0


def test_quantising_twice_is_refused_without_a_trace(task_runs: dict, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = task_runs["classify"]
    assert main(["quantize", "--model", str(run), "--output", str(tmp_path / "once")]) == 0
    assert main(["quantize", "--model", str(tmp_path / "once"), "--output", str(tmp_path / "twice")]) == 2
    assert "already quantised" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists() and not list(tmp_path.glob(".twice*"))
    with pytest.raises(ConfigError, match="already exists"):
        quantize(run, "int8", tmp_path / "once")


def test_quantised_decoder_generates(tiny_decoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", "--model", str(tiny_decoder_dir), "--method", "int4", "--output", str(tmp_path / "q4"),
                 "--group-size", "16"]) == 0
    assert "MB ->" in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "q4"), "--prompt", "reverse: anna", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("reverse: anna")


def test_lora_trains_on_a_frozen_quantised_base(tiny_decoder_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_pretrained(tiny_decoder_dir)
    model.quantization = quantize_model(model, "int8")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_peft(model, PeftSection(method="lora", r=4, alpha=8, targets=["q_proj", "v_proj"]))
    model.peft_config = {"method": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dim() == 2 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.tensor([tokenizer.encode("reverse: anna boris chen")])
    model.train()
    for _ in range(3):
        loss = F.cross_entropy(model.logits(model(ids))[0, :-1], ids[0, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # the integers never move
    assert any(k.endswith("lora_B") and bool(v.abs().sum() > 0) for k, v in state.items())
    save_model(model.eval(), tmp_path / "qlora", tokenizer)
    again = load_model(tmp_path / "qlora")
    with torch.no_grad():
        assert torch.allclose(again.logits(again(ids)), model.logits(model(ids)), atol=1e-6)


def test_int4pack_is_offered_only_for_group_sizes_its_kernel_takes() -> None:
    from lmforge.deploy.quantize import INT4PACK_GROUPS, choose_kernel

    assert choose_kernel(4, False, 64, 48, 16) in ("dequant",)  # 16: the int4pack kernel refuses it
    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 48), 4, 16)
    layer.prepare()  # the kernel measured fastest here
    x = torch.randn(3, 64)
    assert layer.kernel != "int4pack" and torch.isfinite(layer(x)).all()  # no group-size error on any CPU
    if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):  # where the kernel exists, it agrees with dequant
        packed = QuantizedLinear.from_linear(torch.nn.Linear(64, 48), 4, INT4PACK_GROUPS[0])
        packed.prepare("int4pack")
        reference = F.linear(x, packed.dequantized(), packed.bias)
        assert torch.allclose(packed(x), reference, atol=1e-2, rtol=1e-2)


def test_packed_kernels_pass_gradients_to_their_inputs() -> None:
    """QLoRA trains adapters before a quantised layer: the gradient must flow through it
    whichever kernel this CPU's timing picked (the packed kernels have no backward)."""
    cases = [("int8pack", 8, None)] if hasattr(torch, "_weight_int8pack_mm") else []
    if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        cases.append(("int4pack", 4, 32))
    assert cases  # torch 2.13 has both
    for kernel, bits, group in cases:
        layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 48), bits, group)
        layer.prepare(kernel)
        x = torch.randn(3, 64, requires_grad=True)
        layer(x).sum().backward()
        expected = layer.dequantized().sum(0).expand(3, -1)  # d(sum(x W^T))/dx
        assert torch.allclose(x.grad, expected, atol=1e-5), kernel  # type: ignore[arg-type]
        with torch.no_grad():  # inference still takes the packed kernel
            assert torch.allclose(layer(x), F.linear(x, layer.dequantized(), layer.bias), atol=1e-2, rtol=1e-2)

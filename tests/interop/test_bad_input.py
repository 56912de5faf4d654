"""Bad weights and files: each gives a clear error naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lmforge.checkpoint import load_pretrained
from lmforge.errors import ConfigError, CorruptFileError, UnknownArchitectureError, WeightsError
from lmforge.interop.gguf import load_gguf
from lmforge.interop.hf import load_hf
from lmforge.models import DecoderConfig, EncoderConfig


@pytest.fixture()
def llama_folder(tmp_path: Path) -> Path:
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=48, tie_word_embeddings=False)
    folder = tmp_path / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _edit_weights(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor_is_named(llama_folder: Path) -> None:
    _edit_weights(llama_folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing tensor\(s\): layers\.1\.mlp\.up_proj\.weight"):
        load_hf(llama_folder)


def test_wrong_shape_is_named(llama_folder: Path) -> None:
    def widen(t):  # type: ignore[no-untyped-def]
        t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(33, 32)

    _edit_weights(llama_folder, widen)
    with pytest.raises(WeightsError, match=r"layers\.0\.self_attn\.q_proj\.weight: expected \(32, 32\), found \(33, 32\)"):
        load_hf(llama_folder)


def test_unexpected_tensor_is_named(llama_folder: Path) -> None:
    def add(t):  # type: ignore[no-untyped-def]
        t["model.layers.0.mystery.weight"] = torch.zeros(3)

    _edit_weights(llama_folder, add)
    with pytest.raises(WeightsError, match=r"unexpected tensor\(s\).*layers\.0\.mystery\.weight"):
        load_hf(llama_folder)


def test_unknown_architecture(llama_folder: Path) -> None:
    config = json.loads((llama_folder / "config.json").read_text())
    config["model_type"] = "mamba"
    (llama_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownArchitectureError,
                       match=r"model_type='mamba' is not supported \(supported: bert, roformer, gpt2, llama, qwen2\)"):
        load_hf(llama_folder)


def test_truncated_safetensors(llama_folder: Path) -> None:
    path = llama_folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: cannot read safetensors file .*truncated"):
        load_hf(llama_folder)


def test_non_gguf_file_given_as_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip file, not GGUF")
    with pytest.raises(CorruptFileError, match=r"model\.gguf: not a GGUF file"):
        load_gguf(bogus)
    with pytest.raises(CorruptFileError, match="not a GGUF file"):
        load_pretrained(bogus)


def test_truncated_gguf(tmp_path: Path, smollm2_gguf: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as handle:
        cut.write_bytes(handle.read(4096))
    with pytest.raises(CorruptFileError, match=r"cut\.gguf: cannot read GGUF file"):
        load_gguf(cut)


def test_config_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        DecoderConfig(hidden_size=100, num_heads=3, dropout=1.5, norm="batchnorm")
    message = str(caught.value)
    assert "dropout=1.5" in message and "norm='batchnorm'" in message
    with pytest.raises(ConfigError, match="hidden_size=100 is not divisible by num_heads=3"):
        EncoderConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ConfigError, match="num_heads=4 is not divisible by num_kv_heads=3"):
        DecoderConfig(hidden_size=64, num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match=r"unknown key 'hiden_size' \(allowed: .*hidden_size"):
        EncoderConfig.from_dict({"hiden_size": 64})


def test_legacy_bin_is_read_without_unpickling_code(tmp_path: Path) -> None:
    config = transformers.GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=2, n_positions=16)
    folder = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    model, _ = load_hf(folder)
    assert model.config.num_layers == 1

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("code ran",))

    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(CorruptFileError, match="cannot read PyTorch weights safely"):
        load_hf(folder)

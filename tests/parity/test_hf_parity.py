"""Parity against transformers on tiny random configs, both load directions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from lmforge.interop.hf import load_hf, save_hf
from lmforge.models import Decoder, Encoder, MaskedLM, preset

ATOL = 1e-5


def _batch(vocab: int, batch: int = 3, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, vocab, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 6:] = 0  # right padding in row 1
    mask[2, 3:] = 0
    return ids, mask


def _tiny_bert_config() -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, type_vocab_size=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def _hf(cls, config, tmp: Path, name: str):  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    reference = cls(config).eval()
    folder = tmp / name
    reference.save_pretrained(folder)
    return reference, folder


def _close_on_real(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor) -> None:
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], atol=ATOL, rtol=0)


def _run_with_token_types(reference, model):  # type: ignore[no-untyped-def]
    """(their output, our hidden states, mask) on a padded batch whose rows use both token types."""
    model.eval()
    ids, mask = _batch(99)
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    with torch.no_grad():
        return reference(input_ids=ids, attention_mask=mask, token_type_ids=types), model(ids, mask, types), mask


def test_bert_model_parity(tmp_path: Path) -> None:
    reference, folder = _hf(transformers.BertModel, _tiny_bert_config(), tmp_path, "bert")
    model, _ = load_hf(folder)
    assert isinstance(model, Encoder)
    theirs, hidden, mask = _run_with_token_types(reference, model)
    _close_on_real(hidden, theirs.last_hidden_state, mask)
    torch.testing.assert_close(model.pool(hidden), theirs.pooler_output, atol=ATOL, rtol=0)


def test_bert_masked_lm_parity(tmp_path: Path) -> None:
    reference, folder = _hf(transformers.BertForMaskedLM, _tiny_bert_config(), tmp_path, "bert-mlm")
    model, _ = load_hf(folder)
    assert isinstance(model, MaskedLM)
    model.eval()
    ids, mask = _batch(99)
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=mask).logits
        ours = model.logits(model(ids, mask))
    _close_on_real(ours, theirs, mask)


def _tiny_roformer_config() -> transformers.RoFormerConfig:
    return transformers.RoFormerConfig(
        vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, type_vocab_size=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


@pytest.mark.parametrize("cls", [transformers.RoFormerModel, transformers.RoFormerForMaskedLM])
def test_roformer_parity(tmp_path: Path, cls: type) -> None:
    """A rotary encoder (position="rope") is RoFormer: same hidden states and MLM logits."""
    reference, folder = _hf(cls, _tiny_roformer_config(), tmp_path, "roformer")
    with torch.no_grad():  # random values everywhere, so a mispaired rotation cannot hide
        for name, p in reference.named_parameters():
            if "embed_positions" not in name:  # the fixed sinusoid table stays what the config says
                p.add_(torch.randn_like(p) * 0.05)
    reference.save_pretrained(folder)
    model, _ = load_hf(folder)
    assert model.config.position == "rope"
    assert isinstance(model, MaskedLM if cls is transformers.RoFormerForMaskedLM else Encoder)
    theirs, hidden, mask = _run_with_token_types(reference, model)
    if isinstance(model, MaskedLM):
        with torch.no_grad():
            _close_on_real(model.logits(hidden), theirs.logits, mask)
    else:
        _close_on_real(hidden, theirs.last_hidden_state, mask)


def _gpt2_config() -> transformers.GPT2Config:
    return transformers.GPT2Config(
        vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


def _llama_config(tied: bool) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=103, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
        rope_theta=50000.0, tie_word_embeddings=tied, rms_norm_eps=1e-6,
    )


def _qwen2_config() -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=107, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=128, rope_theta=1000000.0, tie_word_embeddings=True,
        rms_norm_eps=1e-6, use_sliding_window=False,
    )


def _assert_same_logits(model: Decoder, reference: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """Our logits equal transformers' on the real (unpadded) positions of a padded batch."""
    model.eval()
    ids, mask = _batch(model.config.vocab_size)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        ours = model.logits(model(ids, mask, positions))
    _close_on_real(ours, theirs, mask)
    return ids, mask, positions, theirs


DECODERS = {
    "gpt2": (transformers.GPT2LMHeadModel, _gpt2_config),
    "qwen2": (transformers.Qwen2ForCausalLM, _qwen2_config),
    "llama-gqa-tied": (transformers.LlamaForCausalLM, lambda: _llama_config(True)),
    "llama-gqa-untied": (transformers.LlamaForCausalLM, lambda: _llama_config(False)),
}


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_parity_with_padding(tmp_path: Path, name: str) -> None:
    cls, make_config = DECODERS[name]
    reference, folder = _hf(cls, make_config(), tmp_path, name)
    model, _ = load_hf(folder)
    assert isinstance(model, Decoder)
    assert model.config.tie_embeddings == reference.config.tie_word_embeddings
    _assert_same_logits(model, reference)


@pytest.mark.parametrize("name", list(DECODERS))
def test_kv_cache_decoding_equals_full_recompute(tmp_path: Path, name: str) -> None:
    cls, make_config = DECODERS[name]
    _, folder = _hf(cls, make_config(), tmp_path, name)
    model, _ = load_hf(folder)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as batched generation uses
    with torch.no_grad():
        full = model.logits(model(ids, mask))
        cache = model.new_cache(2, 12)
        steps = [model.logits(model(ids[:, :5], mask[:, :5], cache=cache))]
        steps.append(model.logits(model(ids[:, 5:8], mask[:, :8], cache=cache)))  # a chunk
        for t in range(8, 12):
            steps.append(model.logits(model(ids[:, t : t + 1], mask[:, : t + 1], cache=cache)))
    incremental = torch.cat(steps, dim=1)
    _close_on_real(incremental, full, mask)


@pytest.mark.parametrize("name", ["bert", "bert-mlm", "roformer", "roformer-mlm", *DECODERS])
def test_round_trip_ours_to_hf_to_transformers(tmp_path: Path, name: str) -> None:
    if name.startswith(("bert", "roformer")):
        config = preset("bert-tiny", vocab_size=99, hidden_size=64, intermediate_size=48,
                        max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0,
                        position="rope" if name.startswith("roformer") else "learned")
        ours = MaskedLM(config) if name.endswith("-mlm") else Encoder(config)
        with torch.no_grad():
            for p in ours.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    else:
        cls, make_config = DECODERS[name]
        _, folder = _hf(cls, make_config(), tmp_path, "src")
        ours, _ = load_hf(folder)
        with torch.no_grad():  # make sure values did not just survive by staying at init
            for p in ours.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    ours.eval()
    out = save_hf(ours, tmp_path / "exported")
    if name in ("bert", "roformer"):
        theirs_model = transformers.AutoModel.from_pretrained(out)
    elif name.endswith("-mlm"):
        theirs_model = transformers.AutoModelForMaskedLM.from_pretrained(out)
    else:
        theirs_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    theirs_model.eval()
    ids, mask = _batch(ours.config.vocab_size)
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids, attention_mask=mask)
        hidden = ours(ids, mask)
        if name in ("bert", "roformer"):
            _close_on_real(hidden, theirs.last_hidden_state, mask)
        else:
            _close_on_real(ours.logits(hidden), theirs.logits, mask)
    # and back: the exported folder loads into an identical model of ours
    again, _ = load_hf(out)
    for (key, a), (key_b, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert key == key_b
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_qwen2_is_llama_with_qkv_biases(tmp_path: Path) -> None:
    """Qwen2 added as one conversion record: q/k/v carry biases, o_proj none; the biases
    are made non-zero here so that the parity covers them."""
    torch.manual_seed(1)
    reference = transformers.Qwen2ForCausalLM(_qwen2_config()).eval()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.5)
    assert not any("o_proj.bias" in name for name, _ in reference.named_parameters())
    reference.save_pretrained(tmp_path / "qwen2")
    model, _ = load_hf(tmp_path / "qwen2")
    assert isinstance(model, Decoder) and model.config.attention_bias and model.config.attention_output_bias is False
    ids, mask, positions, theirs = _assert_same_logits(model, reference)
    exported = transformers.AutoModelForCausalLM.from_pretrained(save_hf(model, tmp_path / "back")).eval()
    assert type(exported).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        again = exported(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    _close_on_real(again, theirs, mask)

"""Model building blocks, presets, checkpoints and generation on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.checkpoint import load_model, load_pretrained, save_model
from lmforge.cli import main
from lmforge.generation import (
    GenerationConfig,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    generate,
    generate_tokens,
)
from lmforge.interop.hf import save_hf
from lmforge.models import PRESETS, Decoder, Encoder, MaskedLM, preset
from lmforge.tokenizer import Tokenizer


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid(name: str) -> None:
    config = preset(name)
    assert config.hidden_size > 0


def test_smollm2_preset_has_135m_parameters() -> None:
    with torch.device("meta"):
        model = Decoder(preset("smollm2-135m"))  # type: ignore[arg-type]
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_encoder_padding_does_not_change_real_positions(position: str) -> None:
    model = Encoder(preset("bert-tiny", vocab_size=50, hidden_dropout=0.0, attention_dropout=0.0,  # type: ignore[arg-type]
                           position=position)).eval()
    ids = torch.randint(1, 50, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(padded, mask)[:, :6], atol=1e-5, rtol=0)


def test_rotary_encoder_sees_order_and_only_relative_offsets() -> None:
    """position="rope": no position table; reordering tokens changes the output, and a
    model whose positions all shift by the same amount gives the same output."""
    torch.manual_seed(0)
    model = Encoder(preset("bert-tiny", vocab_size=50, hidden_dropout=0.0, attention_dropout=0.0,  # type: ignore[arg-type]
                           position="rope", initializer_range=0.2)).eval()  # sharp attention: order shows
    assert model.embeddings.position_embeddings is None
    assert not any("position" in k for k in model.state_dict())
    ids = torch.randint(5, 50, (1, 7))
    with torch.no_grad():
        plain = model(ids)
        shifted = model(ids, position_ids=torch.arange(7)[None] + 11)
        swapped = model(ids[:, [1, 0, *range(2, 7)]])
    torch.testing.assert_close(plain, shifted, atol=1e-5, rtol=0)
    assert not torch.allclose(plain[:, 2:], swapped[:, 2:], atol=1e-3)


def test_rotary_encoder_needs_an_even_head_size() -> None:
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="even"):
        preset("bert-tiny", hidden_size=6, num_heads=2, position="rope")
    with pytest.raises(ConfigError, match="position"):
        preset("bert-tiny", position="alibi")


def test_left_padded_decoder_matches_unpadded() -> None:
    model = Decoder(preset("llama-tiny", vocab_size=60)).eval()  # type: ignore[arg-type]
    ids = torch.randint(0, 60, (1, 7))
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0] + [1] * 7])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(padded, mask)[:, 2:], atol=1e-5, rtol=0)


def _tiny_tokenizer() -> Tokenizer:
    backend = RustTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["the cat sat on the mat", "a dog and a cat", "hello world"] * 20, trainer)
    return Tokenizer(backend, {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"},
                     chat_template="{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                                   "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.mark.parametrize("kind", ["encoder", "mlm", "mlm-rope", "llama", "gpt2"])
def test_checkpoint_round_trip(tmp_path: Path, kind: str) -> None:
    tokenizer = _tiny_tokenizer()
    vocab = tokenizer.vocab_size
    if kind == "encoder":
        model = Encoder(preset("bert-tiny", vocab_size=vocab))  # type: ignore[arg-type]
    elif kind.startswith("mlm"):
        model = MaskedLM(preset("bert-tiny", vocab_size=vocab, position="rope" if kind == "mlm-rope" else "learned"))  # type: ignore[arg-type]
    else:
        model = Decoder(preset(f"{kind}-tiny", vocab_size=vocab, tie_embeddings=kind == "gpt2"))  # type: ignore[arg-type]
    save_model(model, tmp_path / "ckpt", tokenizer)
    again = load_model(tmp_path / "ckpt")
    assert type(again) is type(model) and again.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    _, loaded_tokenizer = load_pretrained(tmp_path / "ckpt")
    assert loaded_tokenizer is not None
    assert loaded_tokenizer.encode("the cat") == tokenizer.encode("the cat")
    assert loaded_tokenizer.chat_template == tokenizer.chat_template


def test_a_tokenizer_larger_than_the_embeddings_is_refused_at_load(tmp_path: Path) -> None:
    from lmforge.errors import WeightsError

    save_model(Decoder(preset("llama-tiny", vocab_size=40)), tmp_path / "ckpt", _tiny_tokenizer())  # type: ignore[arg-type]
    with pytest.raises(WeightsError, match="the tokenizer has 283 tokens but the model has embeddings for 40"):
        load_pretrained(tmp_path / "ckpt")


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    model = Decoder(preset("llama-tiny", vocab_size=40))  # type: ignore[arg-type]
    save_model(model, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    class Broken:
        def save(self, folder: Path) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model(Decoder(preset("llama-tiny", vocab_size=40)), tmp_path / "ckpt", Broken())  # type: ignore[arg-type]
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_top_k_and_top_p_known_answers() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [[False, False, True, True]]
    # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is the first two tokens
    assert torch.isinf(filter_top_p(logits, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_top_p(logits, 0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(filter_top_p(logits[:, [3, 1, 0, 2]], 0.7)).tolist() == [[True, False, False, True]]
    assert torch.isinf(filter_top_p(logits, 1e-300)).tolist() == [[False, True, True, True]]  # p rounds to 0


def test_repetition_penalty_known_answer() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_greedy_generation_equals_recomputed_argmax() -> None:
    model = Decoder(preset("gpt2-tiny", vocab_size=70)).eval()  # type: ignore[arg-type]
    prompt = torch.randint(0, 70, (1, 5))
    tokens = [int(t) for t in generate_tokens(model, prompt, GenerationConfig(max_new_tokens=6))]
    sequence = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = model.logits(model(sequence)[:, -1]).argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, nxt], dim=1)
    assert tokens == sequence[0, 5:].tolist()


def test_batched_left_padded_generation_equals_one_by_one() -> None:
    tokenizer = _tiny_tokenizer()
    model = Decoder(preset("llama-tiny", vocab_size=tokenizer.vocab_size)).eval()  # type: ignore[arg-type]
    prompts = ["the cat sat on", "hello"]
    config = GenerationConfig(max_new_tokens=5, stop_token_ids=[10_000])
    batched = generate(model, tokenizer, prompts, config)
    single = [generate(model, tokenizer, p, config)[0] for p in prompts]
    assert batched == single


def test_sampling_is_seeded_and_stops() -> None:
    tokenizer = _tiny_tokenizer()
    model = Decoder(preset("llama-tiny", vocab_size=tokenizer.vocab_size)).eval()  # type: ignore[arg-type]
    config = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    ids = torch.tensor([tokenizer.encode("the cat")])
    first = [int(t) for t in generate_tokens(model, ids, config)]
    assert first == [int(t) for t in generate_tokens(model, ids, config)]
    stop_at = first[2]
    stopped = [int(t) for t in generate_tokens(model, ids, GenerationConfig(
        **{**config.__dict__, "stop_token_ids": [stop_at]}))]
    assert stopped == first[: first.index(stop_at) + 1]
    text = tokenizer.decode(first[:3])
    cut = generate(model, tokenizer, "the cat", GenerationConfig(**{**config.__dict__, "stop_strings": [text[-1]]}))
    assert text[-1] not in cut[0]


def test_cli_generate_streams_from_checkpoint_and_hf_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tokenizer = _tiny_tokenizer()
    model = Decoder(preset("gpt2-tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=64)).eval()  # type: ignore[arg-type]
    save_model(model, tmp_path / "ckpt", tokenizer)
    save_hf(model, tmp_path / "hf", tokenizer)
    expected = generate(model, tokenizer, "the cat", GenerationConfig(max_new_tokens=6))[0]
    for path in ("ckpt", "hf"):
        assert main(["generate", "--model", str(tmp_path / path), "--prompt", "the cat", "--max_new_tokens", "6"]) == 0
        assert capsys.readouterr().out == "the cat" + expected + "\n"
    assert main(["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "hi", "--chat", "--max_new_tokens", "2"]) == 0
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("column_major", [None, False, True])
@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_decoding_layout_keeps_values_and_outputs(name: str, column_major: bool | None) -> None:
    model = Decoder(preset(name, vocab_size=80, attention_bias=True)).eval()  # type: ignore[arg-type]
    ids = torch.randint(0, 80, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model.logits(model(ids, mask))
        model.use_decoding_layout(not column_major if column_major is not None else None)
        model.use_decoding_layout(column_major)  # switches the layout, or leaves it (idempotent)
        after = model.logits(model(ids, mask))
        cache = model.new_cache(2, 10)
        stepped = torch.cat([model.logits(model(ids[:, :4], mask[:, :4], cache=cache))]
                            + [model.logits(model(ids[:, t : t + 1], mask[:, : t + 1], cache=cache)) for t in range(4, 10)], 1)
    fused = model.layers[0].self_attn.fused_qkv
    assert fused is not None
    assert (fused[0].stride(0) == 1) == (column_major is not False)  # fp32: column-major unless told
    assert model.few_rows == model.layers[0].self_attn.few_rows == (column_major is False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_state[key]), key
    keep = mask.bool()
    torch.testing.assert_close(after[keep], before[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(stepped[keep], before[keep], atol=1e-5, rtol=0)


def test_fused_layout_follows_loaded_weights_and_swapped_modules() -> None:
    model = Decoder(preset("llama-tiny", vocab_size=80)).eval()  # type: ignore[arg-type]
    other = Decoder(preset("llama-tiny", vocab_size=80)).eval()  # type: ignore[arg-type]
    ids = torch.randint(0, 80, (1, 6))
    model.use_decoding_layout()
    model.load_state_dict(other.state_dict())  # in-place copies keep the fused views current
    with torch.no_grad():
        torch.testing.assert_close(model(ids), other(ids), atol=1e-5, rtol=0)

    class Scaled(torch.nn.Linear):  # stands in for an adapter wrapping q_proj
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    attention = model.layers[0].self_attn
    swapped = Scaled(attention.q_proj.in_features, attention.q_proj.out_features, bias=False)
    swapped.weight = attention.q_proj.weight
    attention.q_proj = swapped
    other.layers[0].self_attn.q_proj = swapped
    with torch.no_grad():
        torch.testing.assert_close(model(ids), other(ids), atol=1e-5, rtol=0)


def test_training_after_decoding_layout_reaches_every_weight() -> None:
    model = Decoder(preset("llama-tiny", vocab_size=80)).eval()  # type: ignore[arg-type]
    reference = Decoder(preset("llama-tiny", vocab_size=80))  # type: ignore[arg-type]
    reference.load_state_dict(model.state_dict())
    model.use_decoding_layout()
    ids = torch.randint(0, 80, (2, 7))
    grads = []
    for m in (model, reference):
        m.train()
        m.logits(m(ids)).logsumexp(-1).mean().backward()
        grads.append({k: p.grad for k, p in m.named_parameters()})
    for key, grad in grads[1].items():
        assert grads[0][key] is not None, key
        torch.testing.assert_close(grads[0][key], grad, atol=1e-5, rtol=1e-4)


def test_dropout_keeps_the_expected_share_and_the_mean() -> None:
    from lmforge.models.layers import Dropout

    torch.manual_seed(0)
    layer = Dropout(0.1).train()
    x = torch.ones(200_000)
    out = layer(x)
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.9) < 0.005
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.9))
    assert abs(float(out.mean()) - 1.0) < 0.01  # inverted dropout: the expectation is unchanged
    assert torch.equal(layer.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
    for p, shape, dtype in ((0.5, (7, 13, 11), torch.float32), (0.1, (3, 1001), torch.bfloat16)):  # odd sizes
        x = torch.ones(shape, dtype=dtype, requires_grad=True)
        out = Dropout(p).train()(x)
        assert out.shape == x.shape and out.dtype == dtype
        assert abs(float((out != 0).float().mean()) - (1 - p)) < 4 * (p * (1 - p) / out.numel()) ** 0.5
        out.sum().backward()
        assert torch.equal(x.grad, out.detach())  # type: ignore[arg-type]  # the gradient takes the same mask and scale
    second = layer.train()(torch.ones(200_000))
    assert not torch.equal(second != 0, kept)  # a fresh mask every call


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 9])
@pytest.mark.parametrize("column_major", [False, True])
def test_decode_linear_equals_linear(rows: int, column_major: bool) -> None:
    from lmforge.models.layers import decode_linear, dense_forward

    weight = torch.randn(24, 16)
    weight = weight.t().contiguous().t() if column_major else weight
    bias = torch.randn(24)
    x = torch.randn(rows, 1, 16)
    with torch.inference_mode():
        for few_rows in (False, True):
            torch.testing.assert_close(decode_linear(x, weight, bias, few_rows=few_rows),
                                       torch.nn.functional.linear(x, weight, bias))
    layer = torch.nn.Linear(16, 24)
    seen: list[torch.Tensor] = []
    layer.register_forward_hook(lambda module, inputs, output: seen.append(output))
    with torch.inference_mode():
        dense_forward(layer, x, few_rows=True)
    assert len(seen) == 1  # a hooked layer keeps its own forward


@pytest.mark.parametrize("rows_win", [True, False])
def test_served_decoder_takes_the_layout_the_probe_picks(rows_win: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmforge.models.layers as layers
    from lmforge.serve.models import _generator

    monkeypatch.setattr(layers, "few_rows_layout", lambda hidden, intermediate: rows_win)
    model = Decoder(preset("llama-tiny", vocab_size=80))  # type: ignore[arg-type]
    import types

    served = _generator("chat", model, types.SimpleNamespace(eos_id=None))
    fused = served.model.layers[0].mlp.fused_gate_up
    assert fused is not None and (fused[0].stride(0) == 1) == (not rows_win)
    assert served.model.few_rows == served.model.layers[0].mlp.few_rows == rows_win  # the few-row path only if chosen


def test_few_rows_layout_probe_answers_once_per_shape() -> None:
    from lmforge.models.layers import few_rows_layout

    answer = few_rows_layout(32, 64, budget_mb=4)
    assert isinstance(answer, bool)
    before = few_rows_layout.cache_info().hits
    few_rows_layout(32, 64, budget_mb=4)
    assert few_rows_layout.cache_info().hits == before + 1  # measured once per process and shape


@pytest.mark.parametrize("case", ["plain", "bool", "additive", "causal", "gqa"])
def test_cpu_attention_with_dropout_is_sdpa_with_a_cheaper_mask(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.nn.functional as F

    from lmforge.models import layers

    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8, requires_grad=True)
    kv_heads = 2 if case == "gqa" else 4
    k, v = torch.randn(2, kv_heads, 7, 8), torch.randn(2, kv_heads, 7, 8)
    mask = None
    if case == "bool":
        mask = torch.rand(2, 1, 5, 7) > 0.3
        mask[0, 0, 1] = False  # a query row that sees no key: zeros, as SDPA gives, not NaN
    elif case == "additive":
        mask = torch.randn(2, 1, 5, 7)
    causal, gqa = case == "causal", case == "gqa"
    monkeypatch.setattr(layers, "dropout_bits", lambda x, p: x)  # the maths around the mask
    ours = layers.attention(q, k, v, mask, 0.1, is_causal=causal, enable_gqa=gqa)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(torch.autograd.grad(ours.sum(), q)[0]).all()
    monkeypatch.undo()
    dropped = layers.attention(q, k, v, None, 0.5, enable_gqa=gqa)
    assert not torch.allclose(dropped, F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa))  # the dropout is drawn

"""Real weights that install offline: MiniLM-L6 (HF folder) and SmolLM2-135M (GGUF)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from lmforge.checkpoint import load_pretrained
from lmforge.generation import GenerationConfig, generate
from lmforge.interop.gguf import load_gguf
from lmforge.models import Decoder, Encoder

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "lmforge loads MiniLM from a local folder.",
    "Short one.",
]


def test_minilm_matches_transformers(minilm_dir: Path) -> None:
    model, tokenizer = load_pretrained(minilm_dir)
    assert isinstance(model, Encoder) and tokenizer is not None
    reference = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    batch = hf_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert tokenizer.encode(SENTENCES[0]) == batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    with torch.no_grad():
        theirs = reference(**batch).last_hidden_state
        ours = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    keep = batch["attention_mask"].bool()
    assert (ours[keep] - theirs[keep]).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path):  # type: ignore[no-untyped-def]
    return load_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_gguf: Path):  # type: ignore[no-untyped-def]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return model, tokenizer


def test_smollm2_gguf_logits_match_transformers(smollm2, smollm2_transformers) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = smollm2
    reference, hf_tokenizer = smollm2_transformers
    assert isinstance(model, Decoder)
    assert model.config.num_kv_heads == 3 and model.config.tie_embeddings
    text = "The capital of France is Paris. 中文 and emoji 🤖 too, 12345!"
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer(text)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        theirs = reference(input_ids=x).logits
        ours = model.logits(model(x))
    assert (ours - theirs).abs().max().item() <= 1e-3


def test_smollm2_greedy_says_paris(smollm2) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = smollm2
    [completion] = generate(model, tokenizer, "The capital of France is", GenerationConfig(max_new_tokens=8))
    assert "Paris" in completion


def test_smollm2_chat_template(smollm2) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer = smollm2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.encode("<|im_start|>")[0] == tokenizer.backend.token_to_id("<|im_start|>")

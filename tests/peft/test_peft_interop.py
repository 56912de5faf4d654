"""LoRA adapters saved in the peft format apply to the transformers model with the same
outputs (the real ``peft`` library loads them)."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import transformers

from lmforge.interop.hf import load_hf
from lmforge.peft import PeftSection, apply_peft, save_adapter


def _perturb(model: torch.nn.Module) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.2)


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


@pytest.mark.parametrize("rslora", [False, True])
def test_bert_lora_in_peft_format(tmp_path: Path, rslora: bool) -> None:
    config = transformers.BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(1)
    transformers.BertModel(config).eval().save_pretrained(tmp_path / "bert")
    model, _ = load_hf(tmp_path / "bert")
    model.eval()
    apply_peft(model, PeftSection(method="lora", r=4, alpha=8, rslora=rslora,
                                  targets=["attention.query", "attention.value", "intermediate"]))
    _perturb(model)
    save_adapter(model, tmp_path / "adapter")
    base = transformers.BertModel.from_pretrained(tmp_path / "bert").eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter" / "peft").eval()
    ids, mask = _batch(99)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = model(ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], expected[keep], atol=1e-5, rtol=0)


def test_llama_lora_in_peft_format(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "llama")
    model, _ = load_hf(tmp_path / "llama")
    model.eval()
    apply_peft(model, PeftSection(method="lora", r=4, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "gate_proj", "down_proj"]))
    _perturb(model)
    save_adapter(model, tmp_path / "adapter")
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter" / "peft").eval()
    ids, mask = _batch(101)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        ours = model.logits(model(ids, mask))
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], expected[keep], atol=1e-4, rtol=0)

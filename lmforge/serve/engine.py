"""Text generation for serving: one place for incremental detokenisation, stop strings,
finish reasons, cancellation and the timings a server reports.

``TextStream`` turns generated token ids into text deltas: a delta is released only when it
cannot be the start of a stop string and does not end inside a multi-byte character, so
streamed text equals the non-streamed text exactly. ``Generator.stream`` runs the decoder
(the KV-cache loop of ``lmforge.generation``) and yields those deltas; a ``cancel`` event
set by the caller (a client that went away, a timeout) stops it between two tokens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lmforge.generation import GenerationConfig, check_length, generate_tokens
from lmforge.models import Decoder
from lmforge.tokenizer import Tokenizer


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None  # "stop" (stop token or string), "length", "cancelled"


@dataclass
class Timings:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    started: float = field(default_factory=time.perf_counter)


class TextStream:
    """Incremental detokenisation with stop strings."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: list[str]) -> None:
        self.tokenizer, self.stop_strings = tokenizer, [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already released

    def push(self, token: int) -> tuple[str, bool]:
        """The text now safe to release, and whether a stop string ended the text."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        for stop in self.stop_strings:
            at = text.find(stop)
            if at >= 0:
                out = text[self.sent:at] if at > self.sent else ""
                self.sent = max(self.sent, at)
                return out, True
        if text.endswith("\ufffd"):
            return "", False  # an incomplete multi-byte character: wait for its next token
        hold = 0
        for stop in self.stop_strings:  # keep back a tail that may grow into a stop string
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        end = len(text) - hold
        out = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out, False

    def rest(self) -> str:
        """What was held back, at the end of generation (no stop string followed)."""
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        out = text[self.sent:]
        self.sent = len(text)
        return out


class Generator:
    """A decoder and its tokenizer, serialised by a lock (one generation at a time)."""

    def __init__(self, model: Decoder, tokenizer: Tokenizer) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.lock = threading.Lock()
        self.stop_ids = sorted({*model.config.eos_token_ids,
                                *([tokenizer.eos_id] if tokenizer.eos_id is not None else [])})

    def prompt_ids(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        if messages is not None:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt or "")

    def check(self, prompt_tokens: int, max_new_tokens: int) -> None:
        check_length(self.model, prompt_tokens, max_new_tokens)

    def stream(self, ids: list[int], config: GenerationConfig, cancel: threading.Event | None = None,
               timings: Timings | None = None) -> Iterator[Delta]:
        """Text deltas; the last one carries the finish reason."""
        timings = timings or Timings()
        timings.prompt_tokens = len(ids)
        text = TextStream(self.tokenizer, config.stop_strings)
        plain = GenerationConfig(**{**config.__dict__, "stop_strings": [], "stop_token_ids": self.stop_ids})
        with self.lock, torch.inference_mode():
            tokens = generate_tokens(self.model, torch.tensor([ids]), plain, pad_id=self.stop_ids[0]
                                     if self.stop_ids else 0)
            for token in tokens:
                value = int(token[0])
                if timings.first_token_s is None:
                    timings.first_token_s = time.perf_counter() - timings.started
                if value in self.stop_ids:
                    yield Delta(text.rest(), "stop")
                    return
                timings.completion_tokens += 1
                out, stopped = text.push(value)
                if stopped:
                    yield Delta(out, "stop")
                    return
                if cancel is not None and cancel.is_set():
                    yield Delta(out, "cancelled")
                    return
                if out:
                    yield Delta(out)
            yield Delta(text.rest(), "length")

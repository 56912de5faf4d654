"""Text generation for serving: one place for incremental detokenisation, stop strings,
finish reasons, cancellation and the timings a server reports.

``TextStream`` turns generated token ids into text deltas: a delta is released only when it
cannot be the start of a stop string and does not end inside a multi-byte character, so
streamed text equals the non-streamed text exactly. ``Generator`` batches concurrent
requests continuously on one KV cache and yields each request's deltas; a ``cancel`` event
set by the caller (a client that went away, a timeout) stops a request between two tokens.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.generation import GenerationConfig, check_length, next_token
from lmforge.models import Decoder
from lmforge.models.layers import KVCache
from lmforge.serve.compute import compute
from lmforge.tokenizer import Tokenizer


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None  # "stop" (stop token or string), "length", "cancelled"


@dataclass
class Timings:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    completion_tokens: int = 0
    first_token_s: float | None = None
    started: float = field(default_factory=time.perf_counter)


INITIAL_POSITIONS = 256  # KV buffer positions to start a batch with (they grow on demand)
PREFIX_BLOCK = 16  # prompt tokens per prefix-cache block
PREFILL_TOKENS = 256  # rows x window positions of one batched prefill (more requests wait a step)
PREFIX_CACHE_TOKENS = 4096  # prompt positions the prefix cache keeps (SmolLM2-135M: 46 KB each)


@dataclass
class _Block:
    """Keys and values of one block of prompt tokens, each (layers) x (kv heads, block, hd)."""

    ident: int
    parent: int | str
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    children: int = 0
    used: int = 0


class PrefixCache:
    """Keys and values of prompt prefixes already computed, so that prompts that begin alike
    (a chat template's system prompt, few-shot examples, a conversation's earlier turns) skip
    that part of their prefill.

    Prompts are cut into blocks of ``block`` tokens; a block is found by its parent block and
    its own tokens, so a hit is always an exact prefix of token ids (under the same adapter:
    ``namespace``). Keys and values depend only on the tokens before them and on their
    positions, which a prefix shares, so reuse computes what a full prefill computes.
    Least recently used leaves go first once more than ``max_tokens`` positions are held.
    """

    def __init__(self, block: int = PREFIX_BLOCK, max_tokens: int = PREFIX_CACHE_TOKENS) -> None:
        self.block, self.max_blocks = block, max_tokens // block
        self.blocks: dict[tuple[int | str, tuple[int, ...]], _Block] = {}
        self.by_ident: dict[int, tuple[int | str, tuple[int, ...]]] = {}
        self.clock = 0  # bumped by each lookup: the order in which blocks were last used
        self.last_ident = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def lookup(self, namespace: str, ids: list[int]) -> list[_Block]:
        """The cached blocks that begin ``ids``, leaving at least its last token to compute."""
        found: list[_Block] = []
        parent: int | str = namespace
        self.clock += 1
        for start in range(0, len(ids) - 1 - self.block + 1, self.block):
            block = self.blocks.get((parent, tuple(ids[start:start + self.block])))
            if block is None:
                break
            block.used = self.clock
            found.append(block)
            parent = block.ident
        return found

    def insert(self, namespace: str, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor],
               known: list[_Block]) -> None:
        """Keep the full blocks of ``ids`` past the ``known`` ones; ``keys``/``values`` hold the
        prompt's, one (kv heads, len(ids), hd) tensor per layer."""
        parent: int | str = known[-1].ident if known else namespace
        for start in range(len(known) * self.block, len(ids) - self.block + 1, self.block):
            key = (parent, tuple(ids[start:start + self.block]))
            block = self.blocks.get(key)
            if block is None:
                if not self._make_room():
                    return
                end = start + self.block
                self.last_ident += 1
                block = _Block(self.last_ident, parent,
                               [k[:, start:end].clone() for k in keys], [v[:, start:end].clone() for v in values])
                self.blocks[key] = block
                self.by_ident[block.ident] = key
                if isinstance(parent, int):
                    self.blocks[self.by_ident[parent]].children += 1
            block.used = self.clock
            parent = block.ident

    def _make_room(self) -> bool:
        """Drop least recently used leaves until one more block fits; False if none can go."""
        while len(self.blocks) >= self.max_blocks:
            leaves = [b for b in self.blocks.values() if b.children == 0]
            if not leaves:
                return False
            oldest = min(leaves, key=lambda b: b.used)
            del self.blocks[self.by_ident.pop(oldest.ident)]
            if isinstance(oldest.parent, int):
                self.blocks[self.by_ident[oldest.parent]].children -= 1
        return True


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
        """What was held back, at the end of generation (no stop string followed): the whole
        text is then ``tokenizer.decode`` of every token, an unfinished character included."""
        text = self.tokenizer.decode(self.ids)
        out = text[self.sent:]
        self.sent = len(text)
        return out


@dataclass
class _Row:
    """One request in the running batch."""

    ids: list[int]
    config: GenerationConfig
    cancel: threading.Event | None
    timings: Timings
    out: queue.SimpleQueue[Delta]
    text: TextStream
    generator: torch.Generator | None
    adapter: str = ""  # the adapter this row runs with ("" = the base model)
    start: int = 0  # first cache position of this row (positions before it are padding)
    made: int = 0
    next_token: int = -1


class Generator:
    """Continuous batching on one decoder: requests join the running batch between two decode
    steps and leave it when they finish, so concurrent streams share each step's weights.

    The batch shares one KV cache (grown on demand up to the model's positions) and one length L; row r holds its
    tokens at positions [start_r, L) and a mask hides the rest from it. A request joins by a
    prefill of its own prompt (positions 0..p-1, so rotary angles are its own), whose keys and
    values are copied right-aligned at [L - p, L); when p > L the cache is shifted right first.
    When L reaches the capacity, every row moves left by the smallest start. Rows compute
    exactly what they would alone (masked positions take no attention weight); each row keeps
    its own sampling settings and random generator.

    Adapters (``add_adapter``): a running batch computes with one adapter; a request for
    another waits until the batch drains, then the bank switches (a tensor copy).
    """

    def __init__(self, model: Decoder, tokenizer: Tokenizer, max_rows: int = 8,
                 initial_positions: int = INITIAL_POSITIONS, prefix_cache_tokens: int = PREFIX_CACHE_TOKENS,
                 prefill_tokens: int = PREFILL_TOKENS) -> None:
        self.model, self.tokenizer, self.max_rows = model.eval(), tokenizer, max_rows
        self.initial_positions = initial_positions
        self.prefixes = PrefixCache(max_tokens=prefix_cache_tokens)
        self.prefill_tokens = prefill_tokens
        self.bank: Any = None  # AdapterBank once an adapter is added
        self.adapter = ""  # the adapter the running batch uses
        self.stop_ids = sorted({*model.config.eos_token_ids,
                                *([tokenizer.eos_id] if tokenizer.eos_id is not None else [])})
        self.capacity = model.config.max_position_embeddings
        self.pending: collections.deque[_Row] = collections.deque()
        self.pending_lock = threading.Lock()
        self.rows: list[_Row] = []
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (R, capacity) 1 on each row's real positions
        self.scheduled = False  # a decode step of this generator waits on the compute thread

    # ------------------------------------------------------------------ public
    def prompt_ids(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        if messages is not None:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt or "")

    def check(self, prompt_tokens: int, max_new_tokens: int) -> None:
        check_length(self.model, prompt_tokens, max_new_tokens)

    def add_adapter(self, name: str, folder: str) -> None:
        """Serve the adapter in ``folder`` (an adapter folder made for this base) as ``name``."""
        from lmforge.peft import AdapterBank, adapter_tensors

        with self.pending_lock:
            if self.rows:
                raise RuntimeError("add adapters before serving")
            if self.bank is None:
                self.bank = AdapterBank(self.model)
                self.bank.load(name, folder)
                zeros = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in adapter_tensors(self.model).items()}
                if self.model.peft_config.get("method") != "lora":  # type: ignore[union-attr]
                    raise ConfigError([f"{folder}: serving adapters per request holds LoRA adapters (a zero LoRA "
                                       "update is the base model)"])
                self.bank.adapters[""] = zeros
            else:
                self.bank.load(name, folder)
            self.bank.use("")
            self.model.use_decoding_layout()

    @property
    def adapters(self) -> list[str]:
        return [name for name in (self.bank.adapters if self.bank else {}) if name]

    def stream(self, ids: list[int], config: GenerationConfig, cancel: threading.Event | None = None,
               timings: Timings | None = None, adapter: str = "") -> Iterator[Delta]:
        """Text deltas of one request; the last one carries the finish reason."""
        if adapter and adapter not in self.adapters:
            raise ConfigError([f"no adapter {adapter!r} on this model (adapters: {', '.join(self.adapters) or 'none'})"])
        self.check(len(ids), config.max_new_tokens)
        timings = timings or Timings()
        timings.prompt_tokens = len(ids)
        generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        row = _Row(list(ids), config, cancel, timings, queue.SimpleQueue(), TextStream(self.tokenizer,
                   config.stop_strings), generator, adapter)
        with self.pending_lock:
            self.pending.append(row)
        self._schedule()
        here = compute().here()  # called from a model call (a warm-up): step here, not on the queue
        while True:
            if here:
                while row.out.empty():
                    self._tick()
            delta = row.out.get()
            yield delta
            if delta.finish_reason is not None:
                return

    # ------------------------------------------------------------------ the decode loop
    def _schedule(self) -> None:
        """Queue a decode step on the compute thread unless one is queued already."""
        with self.pending_lock:
            if self.scheduled:
                return
            self.scheduled = True
        compute().submit(self._scheduled_step)

    def _scheduled_step(self) -> None:
        self._tick()
        with self.pending_lock:
            self.scheduled = bool(self.rows or self.pending)
        if self.scheduled:  # behind whatever else waits for the compute thread
            compute().submit(self._scheduled_step)

    def _tick(self) -> None:
        """Admit waiting requests, then one decode step of the running batch."""
        try:
            with torch.inference_mode():
                self._admit()
                if self.rows:
                    self._step()
        except BaseException as error:  # noqa: BLE001 - every waiting request hears of it
            for row in self.rows:
                row.out.put(Delta("", "error"))
            self.rows, self.cache, self.mask = [], None, None
            import logging

            logging.getLogger("lmforge.serve").exception("generation step failed: %s", error)

    def _admit(self) -> None:
        """Move waiting requests into the running batch: those that fit are prefilled together,
        in one forward pass (within ``prefill_tokens``), so a burst of requests reads the
        weights once rather than once each."""
        reusable = self._prefix_reusable()
        batchable = self.model.prompt is None  # a soft prompt sits before the padding: one row at a time
        while len(self.rows) < self.max_rows:
            group: list[tuple[_Row, list[_Block]]] = []
            with self.pending_lock:
                while self.pending and len(self.rows) + len(group) < self.max_rows:
                    if not self.rows and not group and self.pending[0].adapter != self.adapter:
                        self.adapter = self.pending[0].adapter  # an empty batch may switch adapters
                        self.bank.use(self.adapter)
                    # first come, first served: a request for another adapter stops admissions until
                    # the running batch drains, so no adapter waits behind a stream of others
                    if self.pending[0].adapter != self.adapter:
                        break
                    row = self.pending[0]
                    known = self.prefixes.lookup(row.adapter, row.ids) if reusable else []
                    window = max([len(r.ids) - len(k) * self.prefixes.block for r, k in [*group, (row, known)]])
                    if group and (not batchable or (len(group) + 1) * window > self.prefill_tokens):
                        break
                    self.pending.popleft()
                    if row.cancel is not None and row.cancel.is_set():
                        row.out.put(Delta("", "cancelled"))
                        continue
                    group.append((row, known))
            if not group:
                return
            try:
                self._join(group)
            except Exception:  # noqa: BLE001 - these requests fail; the running batch goes on
                import logging

                logging.getLogger("lmforge.serve").exception("prefill failed")
                self._drop([row for row, _ in group if row in self.rows])
                for row, _ in group:
                    row.out.put(Delta("", "error"))

    def _join(self, group: list[tuple[_Row, list[_Block]]]) -> None:
        """Prefill the group's prompts in one forward pass, each after its cached prefix blocks,
        then place each row's keys/values right-aligned in the batch cache.

        The prompts are right-aligned too: row i (p_i tokens, c_i of them cached) holds token j
        at position P - p_i + j, with P the longest prompt; the pass computes the last
        T = max(p_i - c_i) positions, and every earlier position of a row is a cached one (its
        keys and values are copied in) or padding (masked). Positions count each row's own
        tokens, so every row computes what it computes alone.
        """
        block = self.prefixes.block
        rows = [row for row, _ in group]
        lengths = [len(row.ids) for row in rows]
        P = max(lengths)
        T = max(p - len(known) * block for p, (_, known) in zip(lengths, group, strict=True))
        past = P - T
        cache = self.model.new_cache(len(rows), P)
        for keys, values in zip(cache.keys, cache.values, strict=True):
            keys.zero_()
            values.zero_()
        window = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), P, dtype=torch.long)
        for i, ((row, known), p) in enumerate(zip(group, lengths, strict=True)):
            offset = P - p
            mask[i, offset:] = 1
            reused = past - offset  # positions before the window: all in the cached blocks
            if reused > 0:
                for layer in range(len(cache.keys)):
                    cache.keys[layer][i, :, offset:past] = torch.cat([b.keys[layer] for b in known], 1)[:, :reused]
                    cache.values[layer][i, :, offset:past] = torch.cat([b.values[layer] for b in known], 1)[:, :reused]
            row.timings.cached_tokens = len(known) * block
            first = max(0, p - T)  # the row's first token inside the window
            window[i, T - (p - first):] = torch.tensor(row.ids[first:])
        cache.length = past
        hidden = self.model(window, attention_mask=mask if len(rows) > 1 else None, cache=cache)  # 1 row: no padding
        logits = self.model.logits(hidden[:, -1])
        end = cache.length  # P, plus a soft prompt's positions
        for i, ((row, known), p) in enumerate(zip(group, lengths, strict=True)):
            keys = [k[i, :, P - p:end] for k in cache.keys]
            values = [v[i, :, P - p:end] for v in cache.values]
            if self._prefix_reusable():
                self.prefixes.insert(row.adapter, row.ids, keys, values, known)
            self._place(row, keys, values, self._choose(row, logits[i:i + 1]))

    def _place(self, row: _Row, keys: list[torch.Tensor], values: list[torch.Tensor], token: int) -> None:
        """Put a prefilled row's keys/values, each (kv heads, p, hd), right-aligned at the end of
        the batch cache, and hand it its first token."""
        p = keys[0].shape[1]
        if self.cache is None:
            size = min(self.capacity, max(self.initial_positions, p + 1))
            self.cache = self.model.new_cache(0, size)
            self.cache.max_length = size  # the buffers, not the model's limit
            self.mask = torch.zeros(0, size, dtype=torch.long)
        assert self.mask is not None
        length = self.cache.length
        if p > length:  # shift the batch right so that the new prompt fits before L
            self._grow(p + 1)
            self._shift(p - length)
            length = p
        start = length - p
        for layer in range(len(keys)):
            placed_keys = keys[layer].new_zeros(1, *self.cache.keys[layer].shape[1:])
            placed_values = torch.zeros_like(placed_keys)
            placed_keys[0, :, start:length] = keys[layer]
            placed_values[0, :, start:length] = values[layer]
            self.cache.keys[layer] = torch.cat([self.cache.keys[layer], placed_keys])
            self.cache.values[layer] = torch.cat([self.cache.values[layer], placed_values])
        mask = torch.zeros(1, self.mask.shape[1], dtype=torch.long)
        mask[0, start:length] = 1
        self.mask = torch.cat([self.mask, mask])
        row.start = start
        self.rows.append(row)
        if not self._emit(row, token):
            self._drop([row])

    def _prefix_reusable(self) -> bool:
        """Soft prompts and learned prefixes change what a prompt's first positions hold; the
        prefix cache is for plain models (LoRA adapters included: each has its own blocks)."""
        return self.prefixes.max_blocks > 0 and self.model.prompt is None and all(
            block.self_attn.prefix is None for block in self.model.layers)

    def _grow(self, needed: int) -> None:
        """Make room for ``needed`` positions (doubling, up to the model's limit): buffers start
        small and grow with the longest row, so joins and shifts copy little."""
        assert self.cache is not None and self.mask is not None
        size = self.cache.max_length
        if needed <= size:
            return
        bigger = min(self.capacity, max(needed, 2 * size))
        pad = bigger - size
        self.cache.keys = [F.pad(k, (0, 0, 0, pad)) for k in self.cache.keys]  # (R, nkv, S, hd): S grows
        self.cache.values = [F.pad(v, (0, 0, 0, pad)) for v in self.cache.values]
        self.mask = F.pad(self.mask, (0, pad))
        self.cache.max_length = bigger

    def _shift(self, by: int) -> None:
        """Move every row's cache content ``by`` positions (right if > 0, left if < 0)."""
        assert self.cache is not None and self.mask is not None
        self.cache.keys = [k.roll(by, dims=2) for k in self.cache.keys]
        self.cache.values = [v.roll(by, dims=2) for v in self.cache.values]
        self.mask = self.mask.roll(by, dims=1)
        if by > 0:
            self.mask[:, :by] = 0
        else:
            self.mask[:, by:] = 0
        self.cache.length += by
        for row in self.rows:
            row.start += by

    def _step(self) -> None:
        assert self.cache is not None and self.mask is not None
        if self.cache.length + 1 > self.cache.max_length:
            if self.cache.max_length < self.capacity:
                self._grow(self.cache.length + 1)
            else:  # at the model's limit: drop the columns no row uses any more
                self._shift(-min(row.start for row in self.rows))
        length = self.cache.length
        self.mask[:, length] = 1
        tokens = torch.tensor([[row.next_token] for row in self.rows])
        hidden = self.model(tokens, attention_mask=self.mask[:, :length + 1], cache=self.cache)
        logits = self.model.logits(hidden[:, -1])
        finished = []
        for index, row in enumerate(self.rows):
            token = self._choose(row, logits[index:index + 1])
            if not self._emit(row, token):
                finished.append(row)
        self._drop(finished)

    def _choose(self, row: _Row, logits: torch.Tensor) -> int:
        seen = torch.tensor([row.ids[-64:] or [0]])
        return int(next_token(logits, row.config, seen, row.generator)[0])

    def _emit(self, row: _Row, token: int) -> bool:
        """Hand ``token`` to its request; False when the row is finished."""
        if row.timings.first_token_s is None:
            row.timings.first_token_s = time.perf_counter() - row.timings.started
        if token in self.stop_ids:
            row.out.put(Delta(row.text.rest(), "stop"))
            return False
        row.ids.append(token)
        row.made += 1
        row.timings.completion_tokens += 1
        out, stopped = row.text.push(token)
        if stopped:
            row.out.put(Delta(out, "stop"))
            return False
        if row.cancel is not None and row.cancel.is_set():
            row.out.put(Delta(out, "cancelled"))
            return False
        if row.made >= row.config.max_new_tokens:
            row.out.put(Delta(out + row.text.rest(), "length"))
            return False
        if out:
            row.out.put(Delta(out))
        row.next_token = token
        return True

    def _drop(self, finished: list[_Row]) -> None:
        if not finished:
            return
        keep = [i for i, row in enumerate(self.rows) if row not in finished]
        self.rows = [self.rows[i] for i in keep]
        assert self.cache is not None and self.mask is not None
        if not self.rows:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep)
        self.cache.keys = [k.index_select(0, index) for k in self.cache.keys]
        self.cache.values = [v.index_select(0, index) for v in self.cache.values]
        self.mask = self.mask.index_select(0, index)

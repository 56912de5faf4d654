"""Text generation on the KV cache: greedy and sampling, streamed token by token.

``generate_tokens`` yields one (B,) tensor of new token ids per step; rows that have
finished (stop token, stop string) receive ``pad_id`` until every row is done.
Sampling follows the usual order: repetition penalty, temperature, top-k, top-p.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.errors import ConfigError
from lmforge.hardware import module_device
from lmforge.models import Decoder
from lmforge.tokenizer import Tokenizer


@dataclass
class GenerationConfig:
    """How to pick tokens. ``do_sample=False`` is greedy; the sampling knobs then do nothing."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; > 1 discourages tokens already present
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature <= 0:
            problems.append(f"temperature={self.temperature}: must be > 0 (use do_sample=False for greedy)")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k}: must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p}: must be in (0, 1]")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty={self.repetition_penalty}: must be > 0")
        if problems:
            raise ConfigError(problems, where="GenerationConfig")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of every token id in ``seen`` (B, L)."""
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row; the rest become -inf."""
    k = min(k, logits.shape[-1])
    threshold = logits.topk(k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``p`` (always >= 1 token)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= p  # mass before this token already >= p
    drop_sorted[..., 0] = False  # the most likely token always stays (a p that rounds to 0 dropped it)
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(
    logits: torch.Tensor, config: GenerationConfig, seen: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Choose one token per row from (B, V) logits."""
    logits = logits.float()
    if config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if not config.do_sample:
        return logits.argmax(-1)
    logits = logits / config.temperature
    if config.top_k:
        logits = filter_top_k(logits, config.top_k)
    if config.top_p < 1.0:
        logits = filter_top_p(logits, config.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


def check_length(model: Decoder, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse (at once, before any compute) an empty prompt, or a prompt + ``max_new_tokens``
    beyond the positions the model was trained on (learned or rotary)."""
    limit = model.config.max_position_embeddings
    if prompt_tokens == 0:
        raise ConfigError(["the prompt is empty: give at least one token of text"], where="generation")
    if prompt_tokens + max_new_tokens > limit:
        room = f"lower max_new_tokens to {limit - prompt_tokens}" if prompt_tokens < limit else "shorten the prompt"
        raise ConfigError([f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                           f"model's {limit} positions: {room}"], where="generation")


@torch.inference_mode()
def generate_tokens(
    model: Decoder,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    attention_mask: torch.Tensor | None = None,
    tokenizer: Tokenizer | None = None,
    pad_id: int = 0,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, step by step.

    input_ids: (B, T), left-padded when rows differ in length (attention_mask 0 there).
    Stop strings need ``tokenizer`` to decode the generated tail.
    """
    if config.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    B, T = input_ids.shape
    total = T + config.max_new_tokens
    check_length(model, T, config.max_new_tokens)
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(config.seed)
    if not model.training:
        model.use_decoding_layout()
    cache = model.new_cache(B, total)
    mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        mask = torch.ones(B, total, dtype=torch.long, device=input_ids.device)
        mask[:, :T] = attention_mask
    sequence = torch.empty(B, total, dtype=torch.long, device=input_ids.device)
    sequence[:, :T] = input_ids
    stop_ids = torch.tensor(sorted(set(config.stop_token_ids)), dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    generated: list[list[int]] = [[] for _ in range(B)]

    hidden = model(input_ids, mask[:, :T] if mask is not None else None, cache=cache)
    for step in range(config.max_new_tokens):
        length = T + step
        logits = model.logits(hidden[:, -1])  # (B, V): only the last position is needed
        token = next_token(logits, config, sequence[:, :length], generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        sequence[:, length] = token
        yield token
        if len(stop_ids):
            done |= torch.isin(token, stop_ids)
        if config.stop_strings:
            assert tokenizer is not None
            for row in range(B):
                if done[row]:
                    continue
                generated[row].append(int(token[row]))
                tail = tokenizer.decode(generated[row][-16:], skip_special_tokens=False)
                if any(stop in tail for stop in config.stop_strings):
                    done[row] = True
        if bool(done.all()) or step == config.max_new_tokens - 1:
            return
        hidden = model(token[:, None], mask[:, : length + 1] if mask is not None else None, cache=cache)


def generate(
    model: Decoder,
    tokenizer: Tokenizer,
    prompts: str | Sequence[str],
    config: GenerationConfig | None = None,
) -> list[str]:
    """Generate a completion for each prompt (left-padded into one batch); returns text
    cut at the first stop string."""
    config = config or GenerationConfig()
    if isinstance(prompts, str):
        prompts = [prompts]
    encoded = [tokenizer.encode(p) for p in prompts]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(encoded):
        ids[row, width - len(tokens):] = torch.tensor(tokens)
        mask[row, width - len(tokens):] = 1
    if not config.stop_token_ids and tokenizer.eos_id is not None:
        config = GenerationConfig(**{**config.__dict__, "stop_token_ids": [tokenizer.eos_id]})
    stop_ids = set(config.stop_token_ids)
    outputs: list[list[int]] = [[] for _ in encoded]
    finished = [False] * len(encoded)
    device = module_device(model)
    for token in generate_tokens(model, ids.to(device), config, mask.to(device), tokenizer, pad_id=pad):
        for row, value in enumerate(token.tolist()):
            if finished[row]:
                continue
            if value in stop_ids:
                finished[row] = True
                continue
            outputs[row].append(value)
    return [cut_at_stop(tokenizer.decode(tokens), config.stop_strings) for tokens in outputs]


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to the earliest stop string (all of it when none occurs)."""
    cut = min((text.index(stop) for stop in stop_strings if stop in text), default=len(text))
    return text[:cut]

"""Tiny task fixtures: synthetic labeled data whose labels follow from cue words, and tiny
encoder/decoder model folders (random init) with tokenizers trained on that text."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from lmforge.checkpoint import save_model
from lmforge.models import Decoder, Encoder, preset
from lmforge.tokenizer import train_bpe, train_wordpiece

FILLER = ("the a this that one some very quite really film book meal place service day week story show song car "
          "room staff price time thing people city river road").split()
POSITIVE = ["good", "great", "lovely", "excellent"]
NEGATIVE = ["bad", "awful", "poor", "terrible"]
NAMES = ["anna", "boris", "chen", "dmitri", "elena", "farid", "grace", "hiro"]
SURNAMES = ["smith", "ivanova", "wang", "okafor"]
CITIES = ["paris", "lagos", "osaka", "lima", "oslo", "quito"]
CHAT_TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|endoftext|>assistant: {% endif %}")


def filler(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(FILLER) for _ in range(n)]


def sentiment(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = filler(rng, rng.randint(3, 9))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": " ".join(words), "label": "pos" if label else "neg"})
    return rows


def ner(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens = filler(rng, rng.randint(2, 5))
        tags = ["O"] * len(tokens)
        name = [rng.choice(NAMES)] + ([rng.choice(SURNAMES)] if rng.random() < 0.5 else [])
        tokens += ["mr", *name]
        tags += ["O", "B-PER"] + ["I-PER"] * (len(name) - 1)
        tokens += filler(rng, rng.randint(1, 3)) + ["in", rng.choice(CITIES)]
        tags += ["O"] * (len(tokens) - len(tags) - 1) + ["B-LOC"]
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def qa(n: int, seed: int, filler_words: int = 12) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        before = " ".join(filler(rng, rng.randint(2, filler_words)))
        after = " ".join(filler(rng, rng.randint(2, filler_words)))
        code = rng.choice(CITIES + NAMES)
        context = f"{before} . the code is {code} . {after} ."
        start = context.index(f"is {code}") + 3
        rows.append({"id": f"q{index}", "question": "what is the code ?", "context": context,
                     "answers": [{"text": code, "answer_start": start}]})
    return rows


def relation(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        person, city = rng.choice(NAMES), rng.choice(CITIES)
        label = rng.choice(["lives_in", "born_in", "no_relation"])
        verb = {"lives_in": "lives in", "born_in": "was born in", "no_relation": "never saw"}[label]
        text = f"{' '.join(filler(rng, 2))} {person} {verb} {city} {' '.join(filler(rng, 2))}"
        head = text.index(person)
        tail = text.index(city, head + len(person))
        rows.append({"text": text, "head": [head, head + len(person)], "tail": [tail, tail + len(city)],
                     "label": label})
    return rows


def pairs(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        topic = rng.choice(CITIES[:3])
        for _ in range(4):
            match = rng.random() < 0.5
            item_topic = topic if match else rng.choice([c for c in CITIES[:3] if c != topic])
            rows.append({"query": f"trip to {topic}", "item": f"{' '.join(filler(rng, 3))} {item_topic} guide",
                         "label": int(match), "group": f"g{index}"})
    return rows


def translation(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(NAMES) for _ in range(3)]
        rows.append({"prompt": "reverse: " + " ".join(words), "target": " ".join(reversed(words))})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def all_texts() -> list[str]:
    texts = [r["text"] for r in sentiment(400, 1)] + [" ".join(r["tokens"]) for r in ner(200, 1)]
    texts += [r["context"] + " " + r["question"] for r in qa(100, 1)] + [r["text"] for r in relation(100, 1)]
    texts += [r["query"] + " " + r["item"] for r in pairs(50, 1)]
    return texts * 3


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = train_wordpiece(all_texts(), vocab_size=300, show_progress=False)
    config = preset("bert-tiny", hidden_size=64, num_heads=2, intermediate_size=128, vocab_size=tokenizer.vocab_size,
                    max_position_embeddings=256)
    folder = tmp_path_factory.mktemp("models") / "encoder"
    with torch.random.fork_rng():  # the same weights whichever test asks first
        torch.manual_seed(0)
        return save_model(Encoder(config), folder, tokenizer)


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [r["prompt"] + " " + r["target"] for r in translation(300, 1)] + all_texts()
    tokenizer = train_bpe(texts, vocab_size=400, show_progress=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = preset("llama-tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=256,
                    bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    folder = tmp_path_factory.mktemp("models") / "decoder"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return save_model(Decoder(config), folder, tokenizer)


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return tmp_path

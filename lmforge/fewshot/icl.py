"""In-context classification with a decoder: each label's verbalizer words scored by their
log-likelihood after the prompt, zero-shot or after k labelled demonstrations.

    prompt   = instruction + demonstrations (template filled, then the label's first word)
               + the template filled with the text
    score(w) = sum of log P(token | prompt, earlier tokens of w)   (multi-token words summed)
    label    = logsumexp of its words' scores                       (one or more words)
    p        = softmax over labels

Contextual calibration (Zhao et al. 2021): p_cf is p for content-free texts ("N/A", "",
"[MASK]", averaged); the calibrated probabilities are softmax(log p - log p_cf), i.e. W p with
W = diag(1 / p_cf), renormalised: a label the prompt favours regardless of the text loses
that head start. With labelled shots at hand, the same correction can be learned instead
(``calibrate_on``): per-label biases b fitted to the shots, kept as p_cf = softmax(-b).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError, CorruptFileError
from lmforge.fileio import read_json, sha256_file, write_json

CONTENT_FREE = ("N/A", "", "[MASK]")
FORMAT = 1


@dataclass
class IclSettings:
    labels: list[str]
    verbalizers: dict[str, list[str]]  # label -> words (" positive" is scored with its leading space)
    template: str = "Review: {text}\nSentiment:"
    instruction: str = ""
    demonstrations: list[dict[str, str]] = field(default_factory=list)  # {"text", "label"}
    separator: str = "\n\n"
    calibration: list[float] | None = None  # p_cf per label, when calibrated
    calibrated_on: str | None = None  # "content-free" or "N labelled shots"

    def check(self) -> None:
        problems = []
        if "{text}" not in self.template:
            problems.append(f"template {self.template!r} has no {{text}} slot")
        for label in self.labels:
            if not self.verbalizers.get(label):
                problems.append(f"label {label!r} has no verbalizer word (verbalizers: {self.verbalizers})")
        for label in self.verbalizers:
            if label not in self.labels:
                problems.append(f"verbalizer for {label!r}, which is not a label ({', '.join(self.labels)})")
        if problems:
            raise ConfigError(problems)


class IclClassifier:
    def __init__(self, model: Any, tokenizer: Any, settings: IclSettings, batch_size: int = 8) -> None:
        settings.check()
        self.model, self.tokenizer, self.settings, self.batch_size = model.eval(), tokenizer, settings, batch_size
        self.words = {label: [self._ids(spaced(w)) for w in words] for label, words in settings.verbalizers.items()}

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise ConfigError([f"verbalizer word {text!r} has no tokens"])
        return list(ids)

    def prompt(self, text: str) -> str:
        s = self.settings
        shown = [s.template.format(text=d["text"]) + spaced(s.verbalizers[d["label"]][0]) for d in s.demonstrations]
        parts = ([s.instruction] if s.instruction else []) + shown + [s.template.format(text=text)]
        return s.separator.join(parts)

    @torch.inference_mode()
    def log_probs(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, labels) log-probabilities over the labels (uncalibrated)."""
        if all(len(ids) == 1 for words in self.words.values() for ids in words):
            return self._single_token_log_probs(texts)
        return self._sequence_log_probs(texts)

    @torch.inference_mode()
    def _sequence_log_probs(self, texts: Sequence[str]) -> torch.Tensor:
        """Each (text, word) scored as its own sequence: any word, of any number of tokens."""
        rows: list[tuple[int, int, int, list[int], int]] = []  # (text, label, word, ids, prompt length)
        for t, text in enumerate(texts):
            prompt_ids = self._ids(self.prompt(text))
            for l, label in enumerate(self.settings.labels):
                for w, word in enumerate(self.words[label]):
                    rows.append((t, l, w, prompt_ids + word, len(prompt_ids)))
        scores = torch.full((len(texts), len(self.settings.labels), max(len(v) for v in self.words.values())),
                            float("-inf"))
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][3]))
        for start in range(0, len(order), self.batch_size):
            chosen = [rows[i] for i in order[start:start + self.batch_size]]
            width = max(len(r[3]) for r in chosen)
            ids = torch.full((len(chosen), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, row in enumerate(chosen):
                ids[b, :len(row[3])] = torch.tensor(row[3])
                mask[b, :len(row[3])] = 1
            hidden = self.model(ids, mask)  # (B, T, H), right padding
            for b, (t, l, w, sequence, prompt_length) in enumerate(chosen):
                positions = torch.arange(prompt_length - 1, len(sequence) - 1)
                logits = self.model.logits(hidden[b, positions]).float()  # (word tokens, V)
                targets = torch.tensor(sequence[prompt_length:])
                scores[t, l, w] = F.log_softmax(logits, -1).gather(1, targets[:, None]).sum()
        per_label = torch.logsumexp(scores, dim=-1)  # (N, labels)
        return per_label - torch.logsumexp(per_label, dim=-1, keepdim=True)

    @torch.inference_mode()
    def _single_token_log_probs(self, texts: Sequence[str]) -> torch.Tensor:
        """As ``log_probs`` when every verbalizer word is one token: one forward pass of each
        prompt scores every word at once (its last position's next-token distribution)."""
        prompts = [self._ids(self.prompt(text)) for text in texts]
        labels = self.settings.labels
        width = max(len(v) for v in self.words.values())
        word_ids = torch.zeros(len(labels), width, dtype=torch.long)
        present = torch.zeros(len(labels), width, dtype=torch.bool)
        for l, label in enumerate(labels):
            for w, ids in enumerate(self.words[label]):
                word_ids[l, w], present[l, w] = ids[0], True
        scores = torch.full((len(texts), len(labels), width), float("-inf"))
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), self.batch_size):
            chosen = order[start:start + self.batch_size]
            lengths = torch.tensor([len(prompts[i]) for i in chosen])
            ids = torch.full((len(chosen), int(lengths.max())), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, i in enumerate(chosen):
                ids[b, :len(prompts[i])] = torch.tensor(prompts[i])
                mask[b, :len(prompts[i])] = 1
            hidden = self.model(ids, mask)  # (B, T, H), right padding
            last = hidden[torch.arange(len(chosen)), lengths - 1]
            log_p = F.log_softmax(self.model.logits(last).float(), -1)  # (B, V)
            picked = log_p[:, word_ids.reshape(-1)].reshape(len(chosen), len(labels), width)
            scores[chosen] = torch.where(present[None], picked, torch.tensor(float("-inf")))
        per_label = torch.logsumexp(scores, dim=-1)
        return per_label - torch.logsumexp(per_label, dim=-1, keepdim=True)

    def calibrate(self) -> list[float]:
        """p_cf from the content-free texts; kept in the settings (saved with them)."""
        p = self.log_probs(list(CONTENT_FREE)).exp().mean(0)
        self.settings.calibration = (p / p.sum()).tolist()
        self.settings.calibrated_on = "content-free"
        return self.settings.calibration

    def calibrate_on(self, texts: Sequence[str], labels: Sequence[str], l2: float = 1e-2) -> list[float]:
        """Label biases learned from labelled examples (Zhao et al. 2021's alternative when a
        few labels are at hand: W = I, b fitted): b maximises the likelihood of the gold
        labels under softmax(log p + b), with a small L2 pull towards 0, and is kept as
        p_cf = softmax(-b), so it applies exactly as content-free calibration does."""
        names = self.settings.labels
        unknown = sorted({str(label) for label in labels} - set(names))
        if unknown:
            raise ConfigError([f"calibration examples have labels {unknown} that are not among {names}"])
        log_p = self.log_probs(texts).float()
        targets = torch.tensor([names.index(str(label)) for label in labels])
        bias = torch.zeros(len(names), requires_grad=True)
        optimiser = torch.optim.LBFGS([bias], max_iter=100, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            loss = F.cross_entropy(log_p + bias, targets) + l2 * bias.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimiser.step(closure)
        self.settings.calibration = torch.softmax(-bias.detach(), -1).tolist()
        self.settings.calibrated_on = f"{len(texts)} labelled shots"
        return self.settings.calibration

    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, labels): softmax(log p - log p_cf) when calibrated, else p."""
        log_p = self.log_probs(texts)
        if self.settings.calibration is not None:
            log_p = calibrated(log_p, torch.tensor(self.settings.calibration))
        return log_p.exp()

    def predict(self, texts: Sequence[str], progress: bool = False) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm

        from lmforge.fewshot import label_predictions

        out: list[dict[str, Any]] = []
        with tqdm(total=len(texts), disable=not progress, desc="in-context", unit="text", leave=False) as bar:
            for start in range(0, len(texts), 16):
                out += label_predictions(self.settings.labels, self.probabilities(texts[start:start + 16]))
                bar.update(len(texts[start:start + 16]))
        return out

    # ------------------------------------------------------------------ folder
    def save(self, folder: str | Path, decoder: str | Path, task: dict[str, Any] | None = None) -> Path:
        """``fewshot.json``: the settings, the decoder file it runs on (path and SHA-256) and
        the classify task's spec (its field names), which evaluate and predict read."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        decoder = Path(decoder).resolve()
        write_json(folder / "fewshot.json", {"format": FORMAT, "method": "icl", "decoder": str(decoder),
                                             "decoder_sha256": sha256_file(decoder) if decoder.is_file() else None,
                                             "settings": self.settings.__dict__, "task": task})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> IclClassifier:
        from lmforge.checkpoint import load_pretrained

        path = Path(folder) / "fewshot.json"
        if not path.exists():
            raise CorruptFileError(f"{folder}: no fewshot.json (not an in-context classifier folder)")
        saved = read_json(path)
        decoder = Path(saved["decoder"])
        if not decoder.exists():
            raise CorruptFileError(f"{path}: its decoder {decoder} is not there any more")
        if saved.get("decoder_sha256") and decoder.is_file() and sha256_file(decoder) != saved["decoder_sha256"]:
            raise CorruptFileError(f"{path}: {decoder} changed since the classifier was saved (SHA-256 differs)")
        model, tokenizer = load_pretrained(decoder)
        return cls(model, tokenizer, IclSettings(**saved["settings"]))


def spaced(word: str) -> str:
    """A verbalizer word as it follows the prompt: after one space (" positive")."""
    return word if word.startswith(" ") else " " + word.strip()


def calibrated(log_p: torch.Tensor, p_cf: torch.Tensor) -> torch.Tensor:
    """log softmax(log p - log p_cf) over the last dimension."""
    shifted = log_p - p_cf.clamp(min=1e-12).log().to(log_p.dtype)
    return shifted - torch.logsumexp(shifted, dim=-1, keepdim=True)

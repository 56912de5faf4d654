"""A linear-chain CRF over the word tags of a token task, with the tag scheme's rules built
in: a transition the scheme forbids (O -> I-PER in BIO, B-PER -> I-LOC, ...) scores -inf, so
neither the likelihood nor Viterbi decoding ever gives it any mass.

    emissions  (B, L, K)  the head's scores of the first sub-token of each word
    mask       (B, L)     1 for real words (each row's words come first)
    score(y)   = start[y1] + sum_i emit[i, y_i] + sum_i trans[y_i, y_i+1] + end[y_L]
    nll        = logsumexp_y score(y) - score(gold)          (forward algorithm)
    decode     = argmax_y score(y)                            (Viterbi)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

NEG = -1e4  # a forbidden transition: exp(NEG) underflows to 0 in fp32, and NEG + NEG stays finite


def allowed_transitions(labels: Sequence[str], scheme: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K, K) allowed[i, j] for tag i followed by tag j, (K,) allowed first tags, (K,) allowed
    last tags, for BIO or BIOES tags named like ``B-PER``."""

    def split(tag: str) -> tuple[str, str]:
        return (tag, "") if tag == "O" else (tag[0], tag[2:])

    parts = [split(t) for t in labels]
    inside = ("I", "E") if scheme == "BIOES" else ("I",)

    def may_follow(previous: tuple[str, str], current: tuple[str, str]) -> bool:
        (p, p_type), (c, c_type) = previous, current
        open_entity = p in ("B", "I") if scheme == "BIOES" else False
        if c in inside:  # continues an entity of the same type
            return p in ("B", "I") and p_type == c_type
        return not open_entity  # O, B, S: only once any BIOES entity is closed

    allowed = torch.tensor([[may_follow(a, b) for b in parts] for a in parts])
    first = torch.tensor([p[0] not in inside for p in parts])
    last = torch.tensor([p[0] in ("O", "E", "S") if scheme == "BIOES" else True for p in parts])
    return allowed, first, last


class CRF(nn.Module):
    """Transition, start and end scores (learned) under the scheme's constraints (fixed)."""

    def __init__(self, labels: Sequence[str], scheme: str = "BIO") -> None:
        super().__init__()
        k = len(labels)
        self.transitions = nn.Parameter(torch.zeros(k, k))
        self.start = nn.Parameter(torch.zeros(k))
        self.end = nn.Parameter(torch.zeros(k))
        allowed, first, last = allowed_transitions(labels, scheme)
        self.register_buffer("transition_bias", torch.where(allowed, 0.0, NEG), persistent=False)
        self.register_buffer("start_bias", torch.where(first, 0.0, NEG), persistent=False)
        self.register_buffer("end_bias", torch.where(last, 0.0, NEG), persistent=False)

    def save(self, path: Path) -> None:
        """The learned scores alone (exports carry them beside a graph that gives emissions)."""
        from lmforge.fileio import save_tensors

        save_tensors({k: v.detach().float().contiguous() for k, v in self.state_dict().items()}, path)

    @classmethod
    def load(cls, labels: Sequence[str], scheme: str, path: Path) -> CRF:
        from lmforge.errors import CorruptFileError
        from lmforge.fileio import load_tensors
        from lmforge.weights import load_into

        if not path.is_file():
            raise CorruptFileError(f"{path}: missing; this NER model decodes with a CRF (export it again)")
        crf = cls(labels, scheme)
        load_into(crf, load_tensors(path), str(path))
        return crf

    def _scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.transitions + self.transition_bias, self.start + self.start_bias, self.end + self.end_bias)

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Summed negative log-likelihood of the gold ``tags`` (B, L) over the rows with a word."""
        emissions = emissions.float()
        transitions, start, end = self._scores()
        mask = mask.bool()
        rows = mask[:, 0]
        emissions, tags, mask = emissions[rows], tags[rows].clamp(min=0), mask[rows]
        if emissions.shape[0] == 0:
            return emissions.sum() * 0
        batch = torch.arange(emissions.shape[0], device=emissions.device)
        gold = start[tags[:, 0]] + emissions[batch, 0, tags[:, 0]]
        alpha = start + emissions[:, 0]  # (B, K)
        for i in range(1, emissions.shape[1]):
            on = mask[:, i]
            step = transitions[tags[:, i - 1], tags[:, i]] + emissions[batch, i, tags[:, i]]
            gold = gold + torch.where(on, step, torch.zeros_like(step))
            nxt = torch.logsumexp(alpha[:, :, None] + transitions[None] + emissions[:, i, None, :], dim=1)
            alpha = torch.where(on[:, None], nxt, alpha)
        last = tags[batch, mask.sum(1) - 1]
        gold = gold + end[last]
        return (torch.logsumexp(alpha + end, dim=1) - gold).sum()

    @torch.no_grad()
    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """The best tag sequence of each row (as long as its words)."""
        emissions = emissions.float()
        transitions, start, end = self._scores()
        lengths = mask.long().sum(1).tolist()
        score = start + emissions[:, 0]
        history = []
        for i in range(1, emissions.shape[1]):
            best, previous = (score[:, :, None] + transitions[None]).max(dim=1)
            on = mask[:, i].bool()[:, None]
            score = torch.where(on, best + emissions[:, i], score)
            history.append(torch.where(on, previous, torch.arange(score.shape[1], device=score.device)[None]))
        paths = []
        final = (score + end).argmax(1).tolist()
        for row, length in enumerate(lengths):
            if length == 0:
                paths.append([])
                continue
            tag = final[row]
            path = [tag]
            for step in reversed(history[:length - 1]):
                tag = int(step[row, tag])
                path.append(tag)
            paths.append(path[::-1])
        return paths


def compact(scores: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows' kept positions moved to the front, in order: (B, L, K) scores, (B, L) the
    positions taken (to gather labels), (B, L) mask of real ones."""
    lengths = keep.long().sum(1)
    width = max(int(lengths.max()) if lengths.numel() else 0, 1)
    order = torch.argsort((~keep.bool()).to(torch.int8), dim=1, stable=True)[:, :width]
    gathered = scores.gather(1, order[..., None].expand(-1, -1, scores.shape[-1]))
    mask = torch.arange(width, device=scores.device)[None] < lengths[:, None]
    return gathered, order, mask

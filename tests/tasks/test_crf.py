"""The NER CRF: its likelihood and Viterbi decoding equal brute force over every tag
sequence, the scheme's forbidden transitions never come out, and a CRF run learns, saves
and reloads to the same predictions."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from lmforge.tasks.crf import CRF, allowed_transitions, compact
from tests.tasks.conftest import ner, write_jsonl
from tests.tasks.helpers import finetune

BIO = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
BIOES = ["O", "B-LOC", "I-LOC", "E-LOC", "S-LOC", "B-PER", "I-PER", "E-PER", "S-PER"]


def _random_crf(labels: list[str], scheme: str, seed: int) -> CRF:
    generator = torch.Generator().manual_seed(seed)
    crf = CRF(labels, scheme)
    with torch.no_grad():
        for parameter in crf.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return crf


def _brute_force(crf: CRF, emissions: torch.Tensor, labels: list[str], scheme: str
                 ) -> tuple[list[int], torch.Tensor, dict[tuple[int, ...], torch.Tensor]]:
    """(best allowed sequence, log partition over allowed sequences, every allowed sequence's score)."""
    allowed, first, last = allowed_transitions(labels, scheme)
    scores = {}
    for path in itertools.product(range(len(labels)), repeat=emissions.shape[0]):
        if not first[path[0]] or not last[path[-1]] or not all(allowed[a, b] for a, b in itertools.pairwise(path)):
            continue
        total = crf.start[path[0]] + crf.end[path[-1]] + sum(emissions[i, t] for i, t in enumerate(path))
        total = total + sum(crf.transitions[a, b] for a, b in itertools.pairwise(path))
        scores[path] = total
    best = max(scores, key=lambda p: float(scores[p]))
    return list(best), torch.logsumexp(torch.stack(list(scores.values())), 0), scores


@pytest.mark.parametrize(("labels", "scheme", "length"), [(BIO, "BIO", 4), (BIOES, "BIOES", 3)])
def test_viterbi_and_the_likelihood_equal_brute_force(labels: list[str], scheme: str, length: int) -> None:
    crf = _random_crf(labels, scheme, 0)
    emissions = torch.randn(1, length, len(labels), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, length, dtype=torch.bool)
    with torch.no_grad():
        best, log_z, scores = _brute_force(crf, emissions[0], labels, scheme)
    assert crf.decode(emissions, mask) == [best]
    gold = next(iter(scores))
    with torch.no_grad():
        nll = crf.nll(emissions, torch.tensor([gold]), mask)
    assert torch.allclose(nll, log_z - scores[gold], atol=1e-4)


def test_rows_of_different_lengths_decode_as_they_would_alone() -> None:
    crf = _random_crf(BIO, "BIO", 2)
    emissions = torch.randn(3, 5, len(BIO), generator=torch.Generator().manual_seed(3))
    lengths = [5, 2, 3]
    mask = torch.arange(5)[None] < torch.tensor(lengths)[:, None]
    together = crf.decode(emissions, mask)
    tags = torch.zeros(3, 5, dtype=torch.long)  # all O: an allowed sequence at every length
    summed = crf.nll(emissions, tags, mask)
    alone = 0.0
    for row, length in enumerate(lengths):
        one = torch.ones(1, length, dtype=torch.bool)
        assert together[row] == crf.decode(emissions[row:row + 1, :length], one)[0]
        alone = alone + crf.nll(emissions[row:row + 1, :length], tags[row:row + 1, :length], one)
    assert torch.allclose(summed, alone, atol=1e-4)


@pytest.mark.parametrize(("labels", "scheme"), [(BIO, "BIO"), (BIOES, "BIOES")])
def test_decoding_never_breaks_the_scheme_even_when_the_scores_push_it(labels: list[str], scheme: str) -> None:
    crf = CRF(labels, scheme)  # zero learned scores: only the constraints
    generator = torch.Generator().manual_seed(5)
    emissions = torch.randn(64, 7, len(labels), generator=generator)
    inside = [i for i, tag in enumerate(labels) if tag[0] in "IE"]
    emissions[:, :, inside] += 3.0  # argmax alone would put I- after O everywhere
    for path in crf.decode(emissions, torch.ones(64, 7, dtype=torch.bool)):
        tags = [labels[i] for i in path]
        assert tags[0][0] not in "IE"
        for previous, current in itertools.pairwise(tags):
            if current[0] in "IE":
                assert previous[0] in "BI" and previous[2:] == current[2:], tags
            if scheme == "BIOES" and previous[0] in "BI":
                assert current[0] in "IE", tags
        if scheme == "BIOES":
            assert tags[-1][0] in "OES", tags


def test_compact_moves_the_kept_positions_to_the_front_in_order() -> None:
    scores = torch.arange(2 * 5, dtype=torch.float).reshape(2, 5, 1)
    keep = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    gathered, order, mask = compact(scores, keep)
    assert gathered[0, :, 0].tolist() == [1.0, 3.0, 4.0] and gathered[1, 0, 0] == 5.0
    assert order[0].tolist() == [1, 3, 4] and mask.tolist() == [[True, True, True], [True, False, False]]


def test_a_crf_run_learns_and_reloads_to_the_same_predictions(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    from lmforge.recipes.finetune import predict_file

    train = write_jsonl(tmp_path / "train.jsonl", ner(300, 1))
    validation = write_jsonl(tmp_path / "validation.jsonl", ner(80, 2))
    results = finetune(tiny_encoder_dir, tmp_path / "run", "--task", "ner", "--train", str(train), "--validation",
                       str(validation), "--ner.crf", epochs=5)
    assert results["validation"]["entity_f1"] > 0.6, results
    task = json.loads((tmp_path / "run" / "model" / "task.json").read_text())
    assert task["options"]["crf"] is True
    from lmforge.fileio import load_tensors

    head = load_tensors(tmp_path / "run" / "model" / "head.safetensors")
    assert {"crf.transitions", "crf.start", "crf.end"} <= set(head) and head["crf.transitions"].abs().sum() > 0
    written = [json.loads(line) for line in (tmp_path / "run" / "predictions-validation.jsonl").read_text().splitlines()]
    predict_file(tmp_path / "run", [str(validation)], tmp_path / "again.jsonl", progress=False)
    again = [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [a["predicted_tags"] for a in again] == [w["predicted_tags"] for w in written]
    for record in again:  # no I- after O, ever, without any repair
        for previous, current in itertools.pairwise(["O", *record["predicted_tags"]]):
            assert not (current.startswith("I-") and previous[2:] != current[2:]), record["predicted_tags"]

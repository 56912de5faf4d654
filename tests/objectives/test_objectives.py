"""Masking statistics, loss equivalences and the chunked vocabulary loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.data.loader import IGNORE_INDEX
from lmforge.models import Decoder, MaskedLM, preset
from lmforge.objectives import CausalLMObjective, MaskedLMObjective, MaskingConfig, linear_cross_entropy, mask_tokens
from lmforge.objectives.clm import document_ids
from lmforge.objectives.mlm import masked_lm_loss_sum

PAD, CLS, SEP, MASK = 0, 2, 3, 4
SPECIAL = [PAD, CLS, SEP, MASK, 1]


def _batch(batch: int = 64, length: int = 128, vocab: int = 1000) -> torch.Tensor:
    ids = torch.randint(10, vocab, (batch, length))
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[: batch // 4, length // 2 :] = PAD
    return ids


def test_mask_statistics_over_many_batches() -> None:
    generator = torch.Generator().manual_seed(0)
    selected = candidates = masked = randomised = kept = 0
    for _ in range(20):
        ids = _batch()
        inputs, labels = mask_tokens(ids, MASK, 1000, SPECIAL, MaskingConfig(), generator)
        chosen = labels != IGNORE_INDEX
        assert not chosen[torch.isin(ids, torch.tensor(SPECIAL))].any()  # specials and padding never selected
        assert torch.equal(labels[chosen], ids[chosen])
        assert torch.equal(inputs[~chosen], ids[~chosen])
        candidates += int((~torch.isin(ids, torch.tensor(SPECIAL))).sum())
        selected += int(chosen.sum())
        masked += int((inputs[chosen] == MASK).sum())
        kept += int((inputs[chosen] == ids[chosen]).sum())
        randomised += int(((inputs[chosen] != MASK) & (inputs[chosen] != ids[chosen])).sum())
    assert abs(selected / candidates - 0.15) < 0.005
    assert abs(masked / selected - 0.8) < 0.01
    assert abs(kept / selected - 0.1) < 0.01  # (a random draw equal to the original counts as kept)
    assert abs(randomised / selected - 0.1) < 0.01


def test_whole_word_masking_covers_all_pieces() -> None:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 1000, (32, 64))
    starts = torch.rand(32, 64, generator=generator) < 0.4
    starts[:, 0] = True
    total = 0
    for _ in range(10):
        _, labels = mask_tokens(ids, MASK, 1000, SPECIAL, MaskingConfig(whole_word=True), generator, starts)
        chosen = labels != IGNORE_INDEX
        word = torch.cumsum(starts.long(), 1)
        for row in range(32):
            for w in word[row].unique():
                pieces = chosen[row][word[row] == w]
                assert pieces.all() or not pieces.any()  # a word is selected whole or not at all
        total += int(chosen.sum())
    assert abs(total / (10 * 32 * 64) - 0.15) < 0.02


def test_masked_rows_loss_equals_full_head_loss() -> None:
    model = MaskedLM(preset("bert-tiny", vocab_size=1000, hidden_dropout=0.0, attention_dropout=0.0)).eval()  # type: ignore[arg-type]
    ids = _batch(8, 32)
    inputs, labels = mask_tokens(ids, MASK, 1000, SPECIAL, MaskingConfig(), torch.Generator().manual_seed(2))
    mask = (ids != PAD).long()
    hidden = model(inputs, mask)
    ours, _ = masked_lm_loss_sum(model, hidden, labels)
    full = F.cross_entropy(model.logits(hidden).reshape(-1, 1000), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    assert abs(ours.item() - full.item()) <= 1e-6 * max(1.0, full.item())
    torch.testing.assert_close(ours, full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_matches_full_logits(with_bias: bool) -> None:
    hidden = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(500, 32, requires_grad=True)
    bias = torch.randn(500, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 500, (300,))
    targets[::7] = IGNORE_INDEX
    loss, correct = linear_cross_entropy(hidden, weight, targets, chunk_rows=64, bias=bias)
    (loss * 0.5).backward()  # the upstream gradient scales every input's gradient
    got = [hidden.grad.clone(), weight.grad.clone(), *([bias.grad.clone()] if bias is not None else [])]  # type: ignore[union-attr]
    hidden.grad = weight.grad = None
    logits = F.linear(hidden, weight, bias)
    reference = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if bias is not None:
        bias.grad = None
    (reference * 0.5).backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-4)
    for mine, theirs in zip(got, [hidden.grad, weight.grad, *([bias.grad] if bias is not None else [])], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    valid = targets != IGNORE_INDEX
    assert int(correct) == int((logits.argmax(-1)[valid] == targets[valid]).sum())


def test_clm_objective_matches_shifted_cross_entropy() -> None:
    model = Decoder(preset("llama-tiny", vocab_size=200))  # type: ignore[arg-type]
    objective = CausalLMObjective(model)
    ids = torch.randint(0, 200, (3, 16))
    batch, counts = objective.prepare({"input_ids": ids}, torch.Generator())
    assert counts == {"clm": 3 * 15}
    out = objective(batch)
    logits = model.logits(model(ids))
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, 200), ids[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(out.loss_sums["clm"], reference, rtol=1e-5, atol=1e-4)


def test_document_mask_isolates_documents() -> None:
    model = Decoder(preset("gpt2-tiny", vocab_size=50)).eval()  # type: ignore[arg-type]
    sep = 7
    first, second = torch.tensor([[11, 12, 13, sep]]), torch.tensor([[21, 22, 23, 24]])
    packed = torch.cat([first, second], 1)
    docs = document_ids(packed, sep)
    assert docs.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]
    with torch.no_grad():
        together = model(packed, document_ids=docs)
        alone = model(second)
    torch.testing.assert_close(together[:, 4:], alone, atol=1e-5, rtol=0)


def test_mlm_objective_with_sop_head() -> None:
    model = MaskedLM(preset("bert-tiny", vocab_size=1000))  # type: ignore[arg-type]
    objective = MaskedLMObjective(model, MASK, SPECIAL, pair_task="sop")
    ids = _batch(4, 32)
    batch, counts = objective.prepare({"input_ids": ids, "pair_labels": torch.tensor([0, 1, 0, 1])},
                                      [torch.Generator().manual_seed(0)] * 4)
    out = objective(batch)
    assert set(out.loss_sums) == {"mlm", "pair"} and counts["pair"] == 4 and counts["mlm"] > 0
    sum(out.loss_sums.values()).backward()
    assert objective.pair_head.weight.grad is not None

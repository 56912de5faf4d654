"""L2-SP and EWC change training as defined; frozen layers keep their exact weights."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from lmforge.objectives.base import Objective, ObjectiveOutput, Prepared
from lmforge.transfer.regularizers import Anchor, TransferSection, build_anchor, fisher_diagonal, freeze_lower_layers


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(5, 3)
        self.layers = nn.ModuleList(nn.Linear(3, 3) for _ in range(2))


class ToyObjective(Objective):
    """Squared error of a linear map: the gradient (hence the Fisher) is known in closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Linear(2, 1, bias=False)

    def prepare(self, batch: dict[str, torch.Tensor], generators: Sequence[torch.Generator]) -> Prepared:
        return batch, {"mse": int(batch["input_ids"].shape[0])}

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:  # type: ignore[override]
        error = self.model(batch["input_ids"]).squeeze(-1) - batch["y"]
        return ObjectiveOutput({"mse": 0.5 * error.pow(2).sum()})


def test_l2sp_gradient_known_answer() -> None:
    layer = nn.Linear(2, 2)
    anchor = Anchor(layer.named_parameters(), strength=0.5)
    with torch.no_grad():
        layer.weight += torch.tensor([[1.0, -2.0], [0.0, 4.0]])
    layer.weight.grad = torch.ones(2, 2)
    anchor.add_gradients()
    assert torch.allclose(layer.weight.grad, torch.ones(2, 2) + 0.5 * torch.tensor([[1.0, -2.0], [0.0, 4.0]]))
    assert torch.equal(layer.bias.grad, torch.zeros(2))  # unmoved: no pull
    assert anchor.value() == pytest.approx(0.25 * (1 + 4 + 16))
    # and autograd agrees with the analytic gradient
    weight = layer.weight.detach().clone().requires_grad_(True)
    (0.25 * (weight - anchor.start["weight"]).pow(2).sum()).backward()
    assert torch.allclose(weight.grad, 0.5 * (layer.weight - anchor.start["weight"]))


def test_ewc_fisher_on_a_toy_model() -> None:
    objective = ToyObjective()
    with torch.no_grad():
        objective.model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    xs = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    ys = [torch.tensor([0.0]), torch.tensor([1.0])]
    batches = [{"input_ids": x, "y": y} for x, y in zip(xs, ys, strict=True)]
    fisher = fisher_diagonal(objective, batches, ["weight"], max_batches=10)
    # grad of 0.5 (w.x - y)^2 is (w.x - y) x: batch 1 -> (1)(1, 0); batch 2 -> (3)(0, 2)
    assert torch.allclose(fisher["weight"], torch.tensor([[(1.0**2 + 0) / 2, (0 + 6.0**2) / 2]]))
    anchor = build_anchor(TransferSection(regularizer="ewc", strength=1.0), objective, lambda: iter(batches))
    assert anchor is not None and anchor.importance is not None
    assert torch.allclose(anchor.importance["weight"], fisher["weight"] / fisher["weight"].mean())
    with torch.no_grad():
        objective.model.weight += 1.0
    objective.model.weight.grad = None
    anchor.add_gradients()
    assert torch.allclose(objective.model.weight.grad, anchor.importance["weight"])  # λ F (θ - θ0), θ - θ0 = 1


def test_anchor_survives_a_resume(tmp_path: Path) -> None:
    objective = ToyObjective()
    saved = tmp_path / "anchor.safetensors"
    first = build_anchor(TransferSection(regularizer="l2sp", strength=1.0), objective, saved=saved)
    start = objective.model.weight.detach().clone()
    with torch.no_grad():
        objective.model.weight += 3.0  # trained a while, then resumed
    again = build_anchor(TransferSection(regularizer="l2sp", strength=1.0), objective, saved=saved)
    assert first is not None and again is not None
    assert torch.equal(again.start["weight"], start)


def test_frozen_layers_keep_exact_weights() -> None:
    toy = Toy()
    frozen = freeze_lower_layers(toy, 1)
    assert frozen == ["embed_tokens.weight", "layers.0.weight", "layers.0.bias"]
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in toy.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        x = toy.embed_tokens(torch.tensor([1, 2]))
        loss = toy.layers[1](toy.layers[0](x)).pow(2).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = toy.state_dict()
    for name in frozen:
        assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["layers.1.weight"], before["layers.1.weight"])

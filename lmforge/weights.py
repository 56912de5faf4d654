"""Building and filling models from tensors, strictly: every missing, unexpected or wrongly
shaped tensor is named in one ``WeightsError``. Every loader (lmforge folders, Hugging Face
folders, GGUF files, training checkpoints, task heads) goes through these three functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmforge.errors import WeightsError


@dataclass
class LoadReport:
    """What a load did beyond a one-to-one copy."""

    initialised: list[str] = field(default_factory=list)  # ours, freshly initialised
    ignored: list[str] = field(default_factory=list)  # theirs, known and not used


def build_from_state(
    model_class: Callable[[Any], nn.Module],
    config: Any,
    state: dict[str, torch.Tensor],
    source: str,
    optional_prefixes: tuple[str, ...] = (),
    report: LoadReport | None = None,
) -> nn.Module:
    """Build ``model_class(config)`` holding exactly ``state`` (checked as in ``load_into``).

    When every tensor is present the model is built on the meta device and takes the
    tensors as they are, so loading needs no second copy of the weights in memory.
    """
    with torch.device("meta"):
        model = model_class(config)
    expected = model.state_dict()
    if any(k not in state for k in expected):  # some tensors will keep a fresh init
        model = model_class(config)
        load_into(model, state, source, optional_prefixes, report)
        return model
    check_state(expected, state, source, optional_prefixes)
    model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()},
                          assign=True)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(device="cpu")
    return model


def check_state(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, optional_prefixes: tuple[str, ...] = ()
) -> list[str]:
    """Raise one ``WeightsError`` naming the missing, unexpected or wrongly shaped tensors
    (the first few of each kind and how many in all: a wrong hidden size touches every
    tensor); return the missing keys that ``optional_prefixes`` allow."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}"
        for k in state
        if k in expected and expected[k].shape != state[k].shape
    ]
    allowed_missing = [k for k in missing if k.startswith(optional_prefixes)] if optional_prefixes else []
    missing = [k for k in missing if k not in allowed_missing]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_first_few(missing, ', ')}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_first_few(unexpected, ', ')}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensor(s) of the wrong shape: {_first_few(wrong_shape, '; ')}")
    if problems:
        raise WeightsError(f"{source}: " + " | ".join(problems))
    return allowed_missing


def _first_few(items: list[str], separator: str, shown: int = 4) -> str:
    rest = len(items) - shown
    return separator.join(items[:shown]) + (f"{separator}... and {rest} more" if rest > 0 else "")


def load_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    optional_prefixes: tuple[str, ...] = (),
    report: LoadReport | None = None,
) -> LoadReport:
    """Copy ``state`` into ``model`` strictly: every missing, unexpected or wrongly shaped
    tensor is named in one ``WeightsError``. Keys under ``optional_prefixes`` may be
    missing (they keep their fresh initialisation and are listed in the report)."""
    report = report or LoadReport()
    expected = model.state_dict()
    allowed_missing = check_state(expected, state, source, optional_prefixes)
    with torch.no_grad():
        for key, tensor in state.items():
            expected[key].copy_(tensor.to(expected[key].dtype))
    report.initialised.extend(allowed_missing)
    return report

"""What tasks, adapters and exports ask of a model body, whatever its family.

Encoders and decoders both implement it; code outside ``lmforge/models`` talks to this
protocol instead of switching on the class::

    backbone = backbone_of(model)            # the body of a MaskedLM, else the model
    hidden = backbone.hidden_states(batch)   # (B, T, H)
    backbone.attention(0), backbone.input_embeddings(), backbone.causal
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Backbone(Protocol):
    config: Any
    layers: nn.ModuleList
    causal: bool  # decoders (left-to-right attention, can generate)

    def input_embeddings(self) -> nn.Embedding: ...

    def attention(self, index: int) -> nn.Module: ...

    @property
    def key_value_heads(self) -> int: ...

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...


def backbone_of(model: nn.Module) -> Backbone:
    """The body of a model that wraps one (``MaskedLM.backbone``), else the model itself."""
    return getattr(model, "backbone", model)  # type: ignore[no-any-return]

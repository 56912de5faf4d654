"""Soft prompts and attention prefixes.

Prompt tuning (Lester et al. 2021): P trainable vectors are put before the token
embeddings; the model's outputs for them are dropped, so heads see the usual positions.

Prefix tuning (Li & Liang 2021): every attention layer gets P trainable key and value
vectors that every query attends to. While training, the prefixes come from a small
reparameterisation MLP over P embeddings (more stable); ``bake`` replaces the MLP by the
prefixes it produces, which is what adapter files store.
"""

from __future__ import annotations

import torch
from torch import nn


class SoftPrompt(nn.Module):
    def __init__(self, length: int, hidden_size: int, init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.length = length
        self.embedding = nn.Parameter(init.clone() if init is not None else torch.randn(length, hidden_size) * 0.02)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embedding.unsqueeze(0).expand(batch_size, -1, -1)  # (B, P, H)


class PrefixTuning(nn.Module):
    """Key/value prefixes for ``layers`` attention layers, (layers, 2, heads, P, head_dim)."""

    def __init__(self, layers: int, heads: int, head_dim: int, length: int, hidden_size: int,
                 projection: bool = True, projection_size: int = 256) -> None:
        super().__init__()
        self.shape = (layers, 2, heads, length, head_dim)
        self.length = length
        self.projection = projection
        if projection:
            self.embedding = nn.Parameter(torch.randn(length, hidden_size) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(hidden_size, projection_size), nn.Tanh(),
                                     nn.Linear(projection_size, layers * 2 * heads * head_dim))
        else:
            self.prefix = nn.Parameter(torch.randn(*self.shape) * 0.02)
        self._cache: torch.Tensor | None = None

    def values(self) -> torch.Tensor:
        if not self.projection:
            return self.prefix
        layers, _, heads, length, head_dim = self.shape
        flat = self.mlp(self.embedding)  # (P, layers * 2 * heads * hd)
        return flat.view(length, layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of one layer. Layers run in order, so the prefixes (the MLP's
        output) are computed at layer 0 and shared by the others of the same pass."""
        if index == 0 or self._cache is None:
            self._cache = self.values()
        both = self._cache[index]
        return both[0], both[1]

    @torch.no_grad()
    def bake(self) -> None:
        """Replace the reparameterisation MLP by the prefixes it gives now."""
        if self.projection:
            self.prefix = nn.Parameter(self.values().detach().clone())
            del self.mlp
            del self.embedding
            self.projection = False
            self._cache = None

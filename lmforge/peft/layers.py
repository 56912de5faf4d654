"""Parameter-efficient layers that replace ``nn.Linear`` in place.

Each is a subclass of ``nn.Linear`` that keeps the *same* ``weight``/``bias`` Parameters
(so the base model's state-dict keys do not change and the base weights stay frozen)
and adds a few trainable tensors next to them:

    LoRA      y = W x + b + s · B A dropout(x)              A: (r, in), B: (out, r) = 0, s = α/r (rsLoRA: α/√r)
    AdaLoRA   y = W x + b + α/r · P (Λ ⊙ Q x)               SVD form; pruned entries of Λ are masked to 0
    Adapter   y = h + U act(D h),  h = W x + b              Houlsby bottleneck, U = 0 at start
    IA3       y = l ⊙ (W x + b)  (keys, values)   or   y = W (l ⊙ x) + b  (FFN input)

LoRA and IA3 can be merged into ``weight`` for inference (same outputs, no extra cost)
and unmerged again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.layers import Dropout


def add_low_rank(y: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float,
                 dropout: nn.Module) -> torch.Tensor:
    """``y + scale · up (down dropout(x))``, the second product, its scaling and the sum in one
    ``addmm``: two passes fewer over the (tokens x out) output than product, multiply, add
    (a LoRA layer of 384 -> 1,536 on 32 x 456 tokens: forward and backward 388 -> 288 ms)."""
    h = F.linear(dropout(x), down)
    flat = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), up.t(), alpha=scale)
    return flat.reshape(y.shape)


def _adopt(cls: type[nn.Linear], base: nn.Linear) -> nn.Linear:
    """An instance of ``cls`` sharing ``base``'s weight and bias Parameters."""
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = base.in_features, base.out_features
    layer.weight = base.weight
    layer.bias = base.bias
    return layer


class LoraLinear(nn.Linear):
    """Linear layer plus a trainable low-rank update B·A."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    @classmethod
    def wrap(cls, base: nn.Linear, r: int, alpha: float, dropout: float, rslora: bool = False) -> LoraLinear:
        layer = _adopt(cls, base)
        assert isinstance(layer, LoraLinear)
        layer.r = r
        layer.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        layer.lora_dropout = Dropout(dropout)
        layer.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype))
        layer.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))  # as peft: B = 0, so the start is the base model
        layer.merged = False
        return layer

    def delta(self) -> torch.Tensor:
        return self.lora_B @ self.lora_A * self.scaling  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return add_low_rank(y, x, self.lora_A, self.lora_B, self.scaling, self.lora_dropout)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta().to(self.weight.dtype)
            self.merged = False


class AdaLoraLinear(nn.Linear):
    """Linear layer plus an SVD-form update P·diag(Λ)·Q whose rank a budget prunes."""

    lora_A: nn.Parameter  # Q: (r, in)
    lora_E: nn.Parameter  # Λ: (r, 1)
    lora_B: nn.Parameter  # P: (out, r)

    @classmethod
    def wrap(cls, base: nn.Linear, r: int, alpha: float, dropout: float) -> AdaLoraLinear:
        layer = _adopt(cls, base)
        assert isinstance(layer, AdaLoraLinear)
        layer.r = r
        layer.alpha = alpha
        layer.lora_dropout = Dropout(dropout)
        layer.lora_A = nn.Parameter(torch.randn(r, base.in_features, dtype=base.weight.dtype) * 0.02)
        layer.lora_E = nn.Parameter(torch.zeros(r, 1, dtype=base.weight.dtype))  # Λ = 0: the start is the base model
        layer.lora_B = nn.Parameter(torch.randn(base.out_features, r, dtype=base.weight.dtype) * 0.02)
        layer.register_buffer("lora_rank_mask", torch.ones(r, 1, dtype=base.weight.dtype))
        return layer

    def active_rank(self) -> int:
        return int(self.lora_rank_mask.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        scale = self.alpha / self.r  # the starting rank, as peft does: pruning does not rescale the others
        return add_low_rank(y, x, self.lora_A * self.lora_E * self.lora_rank_mask, self.lora_B, scale,
                            self.lora_dropout)


class AdapterLinear(nn.Linear):
    """Linear layer whose output passes through a residual bottleneck adapter."""

    @classmethod
    def wrap(cls, base: nn.Linear, size: int) -> AdapterLinear:
        layer = _adopt(cls, base)
        assert isinstance(layer, AdapterLinear)
        layer.adapter_down = nn.Linear(base.out_features, size)
        layer.adapter_up = nn.Linear(size, base.out_features)
        for module in (layer.adapter_down, layer.adapter_up):
            module.to(base.weight.dtype)
        nn.init.normal_(layer.adapter_down.weight, std=0.02)
        nn.init.zeros_(layer.adapter_down.bias)
        nn.init.zeros_(layer.adapter_up.weight)  # identity at the start
        nn.init.zeros_(layer.adapter_up.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.weight, self.bias)
        return h + self.adapter_up(F.gelu(self.adapter_down(h)))


class IA3Linear(nn.Linear):
    """Linear layer with a learned per-feature scale on its output (or its input)."""

    ia3_l: nn.Parameter

    @classmethod
    def wrap(cls, base: nn.Linear, scale_input: bool) -> IA3Linear:
        layer = _adopt(cls, base)
        assert isinstance(layer, IA3Linear)
        layer.scale_input = scale_input
        size = base.in_features if scale_input else base.out_features
        layer.ia3_l = nn.Parameter(torch.ones(size, dtype=base.weight.dtype))
        layer.merged = False
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if self.scale_input:
            return F.linear(x * self.ia3_l, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) * self.ia3_l

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if self.scale_input:
            self.weight *= self.ia3_l[None, :]
        else:
            self.weight *= self.ia3_l[:, None]
            if self.bias is not None:
                self.bias *= self.ia3_l
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.scale_input:
            self.weight /= self.ia3_l[None, :]
        else:
            self.weight /= self.ia3_l[:, None]
            if self.bias is not None:
                self.bias /= self.ia3_l
        self.merged = False

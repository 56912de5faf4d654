"""AdaLoRA's rank allocation (Zhang et al. 2023), run by the trainer at every step.

Each adapted layer holds P·diag(Λ)·Q. After each backward pass the controller

* smooths the sensitivity s = |θ·∇θ| of every entry of P, Λ and Q (EMA with β1) and its
  uncertainty |s − Ī| (EMA with β2); an entry's importance is Ī·Ū, a triplet's
  (P column, λ, Q row) is the λ score plus the mean scores of its P column and Q row;
* adds the gradient of the orthogonality regulariser γ·(‖QQᵀ−I‖² + ‖PᵀP−I‖²), averaged
  over layers (analytically: 4(QQᵀ−I)Q and 4P(PᵀP−I)).

After each optimizer step it keeps the ``budget(t)`` most important triplets over all
layers and masks the others (λ = 0): the budget falls from init_r to target_r per layer
on a cubic schedule between ``tinit`` and ``total − tfinal``, then stays. The user calls
nothing; ``ranks()`` reports each layer's final rank.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.peft.layers import AdaLoraLinear


class AdaLoraController:
    def __init__(self, model: nn.Module, total_steps: int, init_r: int, target_r: int, tinit: int, tfinal: int,
                 delta_t: int, beta1: float, beta2: float, orth_reg: float) -> None:
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, AdaLoraLinear)}
        if not self.layers:
            raise ValueError("no AdaLoRA layers in this model")
        self.total, self.init_r, self.target_r = total_steps, init_r, target_r
        self.tinit, self.tfinal, self.delta_t = tinit, tfinal, delta_t
        self.beta1, self.beta2, self.orth_reg = beta1, beta2, orth_reg
        self.importance: dict[int, torch.Tensor] = {}
        self.uncertainty: dict[int, torch.Tensor] = {}

    def budget(self, step: int) -> int:
        """Triplets kept over all layers after ``step`` optimizer steps."""
        start, end = self.init_r * len(self.layers), self.target_r * len(self.layers)
        if step < self.tinit:
            return start
        if step >= self.total - self.tfinal:
            return end
        fraction = 1 - (step - self.tinit) / max(self.total - self.tfinal - self.tinit, 1)
        return int(end + (start - end) * fraction**3)

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        count = len(self.layers)
        for layer in self.layers.values():
            for parameter in (layer.lora_A, layer.lora_E, layer.lora_B):
                if parameter.grad is None:
                    continue
                key = id(parameter)
                sensitivity = (parameter * parameter.grad).abs()
                if key not in self.importance:
                    self.importance[key] = torch.zeros_like(sensitivity)
                    self.uncertainty[key] = torch.zeros_like(sensitivity)
                self.importance[key].mul_(self.beta1).add_(sensitivity, alpha=1 - self.beta1)
                self.uncertainty[key].mul_(self.beta2).add_((sensitivity - self.importance[key]).abs(),
                                                            alpha=1 - self.beta2)
            if self.orth_reg and layer.lora_A.grad is not None:
                q, p = layer.lora_A, layer.lora_B  # Q: (r, in), P: (out, r)
                eye = torch.eye(q.shape[0], dtype=q.dtype, device=q.device)
                layer.lora_A.grad.add_(4 * (q @ q.T - eye) @ q, alpha=self.orth_reg / count)
                layer.lora_B.grad.add_(4 * p @ (p.T @ p - eye), alpha=self.orth_reg / count)

    def _score(self, parameter: torch.Tensor) -> torch.Tensor:
        key = id(parameter)
        if key not in self.importance:
            return torch.zeros_like(parameter)
        return self.importance[key] * self.uncertainty[key]

    @torch.no_grad()
    def triplet_scores(self) -> dict[str, torch.Tensor]:
        return {name: self._score(m.lora_E).view(-1) + self._score(m.lora_A).mean(1) + self._score(m.lora_B).mean(0)
                for name, m in self.layers.items()}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if step < self.tinit or step > self.total - self.tfinal or (step - self.tinit) % self.delta_t:
            self._apply_masks()
            return
        scores = self.triplet_scores()
        flat = torch.cat(list(scores.values()))
        keep = min(self.budget(step), flat.numel())
        threshold = flat.kthvalue(flat.numel() - keep).values if keep < flat.numel() else flat.min() - 1
        for name, layer in self.layers.items():
            layer.lora_rank_mask.copy_((scores[name] > threshold).to(layer.lora_rank_mask.dtype).view(-1, 1))
        self._apply_masks()

    def _apply_masks(self) -> None:
        for layer in self.layers.values():
            layer.lora_E.mul_(layer.lora_rank_mask)

    def _named(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{part}": getattr(layer, part) for name, layer in self.layers.items()
                for part in ("lora_A", "lora_E", "lora_B")}

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The smoothed scores, by parameter name (saved in training checkpoints: exact resume)."""
        named = self._named()
        return {"importance": {n: self.importance[id(p)] for n, p in named.items() if id(p) in self.importance},
                "uncertainty": {n: self.uncertainty[id(p)] for n, p in named.items() if id(p) in self.uncertainty}}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        named = self._named()
        self.importance = {id(named[n]): t for n, t in state["importance"].items()}
        self.uncertainty = {id(named[n]): t for n, t in state["uncertainty"].items()}

    def ranks(self) -> dict[str, int]:
        return {name: layer.active_rank() for name, layer in self.layers.items()}

    def metrics(self) -> dict[str, float]:
        ranks = self.ranks()
        return {"adalora_rank_mean": sum(ranks.values()) / len(ranks)}

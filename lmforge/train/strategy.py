"""How one training run is spread over processes: one process, DDP, or FSDP2.

The trainer asks the strategy, never torch.distributed directly, for the five things
that differ between them::

    module = strategy.setup(objective)          # device, wrapping (DDP) or sharding (FSDP2)
    with strategy.gradient_sync(module, last):  # no all-reduce on all but the last micro-batch
        loss.backward()
    norm = strategy.clip_grad_norm(params, 1.0) # the global norm, also over shards
    state = strategy.model_state(objective)     # the full weights, on rank 0 (collective)
    strategy.save_optimizer / load_optimizer    # torch.distributed.checkpoint: any world size

Optimizer state is always written with ``torch.distributed.checkpoint`` keyed by parameter
names, so a checkpoint written by 2 FSDP ranks resumes on 1 process and one written by one
process resumes on 2 ranks (DCP reshards on load). The weights in every checkpoint are an
ordinary model folder (full tensors), so a sharded run needs no consolidation step.

FSDP2 shards every transformer layer, then the objective as the root group (embeddings,
tied output projections and task heads live there, so methods such as ``model.logits``
that run inside the objective's forward see whole weights).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.train.dist import Distributed

StrategyName = Literal["auto", "single", "ddp", "fsdp"]


class Strategy:
    """``auto``: DDP under torchrun with several processes, else one process."""

    def __init__(self, name: StrategyName, dist: Distributed, device: torch.device) -> None:
        if name == "auto":
            name = "ddp" if dist.enabled else "single"
        if name in ("ddp", "fsdp") and not dist.enabled:
            name = "single"  # one process: nothing to distribute; the same config runs anywhere
        if name == "single" and dist.enabled:
            raise ConfigError([f"strategy=single with {dist.world_size} processes: use ddp or fsdp (or auto)"],
                              where="train")
        self.name: str = name
        self.dist = dist
        self.device = device

    @property
    def sharded(self) -> bool:
        return self.name == "fsdp"

    # ------------------------------------------------------------------ set-up
    def setup(self, objective: nn.Module) -> nn.Module:
        """Move ``objective`` to the device and wrap or shard it; returns what to call."""
        objective.to(self.device)
        if self.name == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(objective, device_ids=ids, find_unused_parameters=True)
        if self.name == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in transformer_layers(objective):
                fully_shard(layer)
            fully_shard(objective)
        return objective

    def gradient_sync(self, module: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Gradients are reduced across ranks only when ``sync`` (the last micro-batch)."""
        if self.name == "ddp" and not sync:
            return module.no_sync()  # type: ignore[operator,no-any-return]
        if self.name == "fsdp":
            return _fsdp_sync(module, sync)
        return contextlib.nullcontext()

    def clip_grad_norm(self, parameters: Iterable[nn.Parameter], max_norm: float | None) -> float:
        """Clip to ``max_norm`` (None: only measure); returns the norm before clipping (the
        global one when sharded)."""
        parameters = list(parameters)
        if max_norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
        else:
            norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor: the norm over every shard
            norm = norm.full_tensor()
        return float(norm)

    # ------------------------------------------------------------------ state
    def model_state(self, objective: nn.Module) -> dict[str, torch.Tensor]:
        """The objective's full state dict (CPU tensors on rank 0; empty on other FSDP ranks).
        Collective under FSDP: every rank must call it."""
        if self.name == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return dict(objective.state_dict())

    def load_model_state(self, objective: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a full state dict (every rank passes the same) into the possibly sharded objective."""
        if self.name == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(objective, state, options=StateDictOptions(full_state_dict=True, strict=False))
            return
        objective.load_state_dict(state, strict=False)

    def save_optimizer(self, objective: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        """Optimizer state keyed by parameter name, with torch.distributed.checkpoint (every rank calls)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = {"optimizer": get_optimizer_state_dict(objective, optimizer)}
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=str(folder), no_dist=not self.dist.enabled)

    def load_optimizer(self, objective: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        """Read optimizer state written by any number of ranks into this run's layout."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        state = {"optimizer": get_optimizer_state_dict(objective, optimizer)}
        # parameters that never had a gradient (an unused pooler) have no saved state: leave them without
        saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        names = {key.split(".", 2)[2].rsplit(".", 1)[0] for key in saved if key.startswith("optimizer.state.")}
        for name in [n for n in state["optimizer"]["state"] if n not in names]:
            del state["optimizer"]["state"][name]
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(folder), no_dist=not self.dist.enabled)
        set_optimizer_state_dict(objective, optimizer, state["optimizer"], options=StateDictOptions(strict=False))


@contextlib.contextmanager
def _fsdp_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    module.set_requires_gradient_sync(sync)  # type: ignore[operator]
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)  # type: ignore[operator]


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """torch.distributed.checkpoint warns on every call without a process group; one process
    is a deliberate use here, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def transformer_layers(module: nn.Module) -> list[nn.Module]:
    """The blocks of every ``layers`` ModuleList inside ``module`` (the units FSDP shards)."""
    blocks: list[nn.Module] = []
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and name.split(".")[-1] == "layers":
            blocks.extend(child)
    return blocks

"""torchrun support: one process per device, gloo on CPU, nccl on GPU; rank 0 writes files."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums across ranks (identity in one process)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @property
    def restarted(self) -> bool:
        """Whether torchrun restarted this worker group after a failure (elastic runs resume then)."""
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def setup_distributed(device: str = "auto") -> Distributed:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): one GPU per
    process (nccl) when ``device`` resolves to CUDA, else CPU processes (gloo)."""
    from lmforge.hardware import resolve_device

    chosen = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(device=chosen)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if chosen.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent keeps one store across restarts: keys of the failed attempt (the old
            # workers' addresses) would be read by the new group, so each attempt gets its own prefix
            from datetime import timedelta

            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                  is_master=False, timeout=timedelta(minutes=10))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"lmforge/attempt-{attempt}", store),
                                    rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return Distributed(rank, world_size, device)

"""A worker for the elastic test, launched by torchrun: trains the tiny BERT with DDP,
saving every 2 steps; on the first attempt rank 1 is killed after step ``--kill-at``.
torchrun restarts the group, which resumes from the last checkpoint."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch

from lmforge.data.shards import TokenShards
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig, Trainer
from lmforge.train.dist import setup_distributed
from tests.train.test_trainer import make_loader, make_objective


class KillAt:
    """A step hook that kills this process (SIGKILL, no clean-up) after ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, step: int) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--folder", "--shards", "--tokenizer"):
        parser.add_argument(name, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--kill-at", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed = setup_distributed("cpu")
    tokenizer = Tokenizer.load(args.tokenizer)
    config = TrainConfig(steps=args.steps, batch_size=16, micro_batch_size=8, lr=1e-3, warmup_steps=1, precision="fp32",
                         eps=1e-6, log_every=1, save_every=2)
    first_attempt = not distributed.restarted
    hooks = [KillAt(args.kill_at)] if first_attempt and distributed.rank == 1 else []
    loader = make_loader(TokenShards(args.shards), tokenizer, 8, distributed.rank, distributed.world_size)
    trainer = Trainer(make_objective(tokenizer), loader, config, Path(args.folder), tokenizer=tokenizer,
                      distributed=distributed, progress=False, hooks=hooks)
    if distributed.restarted:
        assert trainer.resume()
        (Path(args.folder) / f"resumed-at-{trainer.step}").touch()
    trainer.fit()
    if distributed.is_main:
        torch.save({k: v.detach().clone() for k, v in trainer.objective.state_dict().items()},
                   Path(args.folder) / "params.pt")
    torch.distributed.barrier()  # neither rank tears gloo down while the other still uses it
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

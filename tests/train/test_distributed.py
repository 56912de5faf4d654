"""DDP on 2 CPU ranks (gloo) gives the same parameters as one process on the same global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from lmforge.data.shards import TokenShards
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig, Trainer
from lmforge.train.dist import setup_distributed
from tests.train.test_trainer import make_loader, make_objective

STEPS, BATCH, MICRO = 3, 16, 8


def _config() -> TrainConfig:
    return TrainConfig(steps=STEPS, batch_size=BATCH, micro_batch_size=MICRO, lr=1e-3, precision="fp32", eps=1e-6,
                       log_every=1)


def _rank(rank: int, port: int, folder: str, shards_folder: str, tokenizer_folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed = setup_distributed()
    tokenizer = Tokenizer.load(tokenizer_folder)
    loader = make_loader(TokenShards(shards_folder), tokenizer, MICRO, rank=rank, world=2)
    trainer = Trainer(make_objective(tokenizer), loader, _config(), Path(folder), tokenizer=tokenizer,
                      distributed=distributed, progress=False)
    batches = iter(loader)
    while trainer.step < STEPS:
        trainer.train_step(batches)
    if rank == 0:
        torch.save(trainer.objective.state_dict(), Path(folder) / "ddp.pt")
    torch.distributed.barrier()  # neither rank tears gloo down while the other still uses it
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(zh_tokenizer: Tokenizer, zh_shards: TokenShards, tmp_path: Path) -> None:
    zh_tokenizer.save(tmp_path)
    mp.start_processes(_rank, args=(_free_port(), str(tmp_path), str(zh_shards.folder), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    distributed = torch.load(tmp_path / "ddp.pt", weights_only=True)
    single = Trainer(make_objective(zh_tokenizer), make_loader(zh_shards, zh_tokenizer, MICRO), _config(),
                     tmp_path / "single", tokenizer=zh_tokenizer, progress=False)
    assert single.accumulation == 2
    batches = iter(single.loader)
    while single.step < STEPS:
        single.train_step(batches)
    for key, value in single.objective.state_dict().items():
        torch.testing.assert_close(distributed[key], value, atol=1e-5, rtol=0)

"""FSDP2 and sharded checkpoints on 2 CPU ranks (gloo): the same losses and parameters as
one process, and checkpoints that resume on another number of ranks."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from lmforge.data.shards import TokenShards
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig, Trainer
from lmforge.train.dist import Distributed, setup_distributed
from tests.train.test_trainer import make_loader, make_objective

BATCH, MICRO = 16, 8


def _config(steps: int, strategy: str) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=BATCH, micro_batch_size=MICRO, lr=1e-3, warmup_steps=1,
                       precision="fp32", eps=1e-6, log_every=1, strategy=strategy)  # type: ignore[arg-type]


def _run(folder: Path, shards: TokenShards, tokenizer: Tokenizer, strategy: str, until: int, steps: int,
         resume: bool, distributed: Distributed | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train (resuming first when asked) to step ``until`` of a ``steps``-step schedule, save a
    checkpoint there; returns the step losses and the full parameters (rank 0)."""
    rank, world = (distributed.rank, distributed.world_size) if distributed else (0, 1)
    trainer = Trainer(make_objective(tokenizer), make_loader(shards, tokenizer, MICRO, rank, world),
                      _config(steps, strategy), folder, tokenizer=tokenizer, distributed=distributed, progress=False)
    if resume:
        assert trainer.resume()
    batches = iter(trainer.loader)
    losses = []
    while trainer.step < until:
        losses.append(trainer.train_step(batches)["loss"])
    trainer.save()
    state = trainer.strategy.model_state(trainer.objective)
    return losses, {k: v.detach().cpu().clone() for k, v in state.items()}


def _rank(rank: int, port: int, folder: str, shards: str, tokenizer: str, strategy: str, until: int, steps: int,
          resume: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed = setup_distributed("cpu")
    losses, state = _run(Path(folder), TokenShards(shards), Tokenizer.load(tokenizer), strategy, until, steps, resume,
                         distributed)
    if rank == 0:
        torch.save(state, Path(folder) / "params.pt")
        (Path(folder) / "losses.json").write_text(json.dumps(losses))
    torch.distributed.barrier()  # neither rank tears gloo down while the other still uses it
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_ranks(folder: Path, shards: TokenShards, tokenizer_folder: Path, strategy: str, until: int, steps: int,
               resume: bool = False) -> tuple[list[float], dict[str, torch.Tensor]]:
    mp.start_processes(_rank, args=(_free_port(), str(folder), str(shards.folder), str(tokenizer_folder), strategy,
                                    until, steps, resume), nprocs=2, join=True, start_method="spawn")
    return json.loads((folder / "losses.json").read_text()), torch.load(folder / "params.pt", weights_only=True)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, atol=2e-5, rtol=0, msg=key)


def test_fsdp_on_two_ranks_equals_one_process(zh_tokenizer: Tokenizer, zh_shards: TokenShards, tmp_path: Path) -> None:
    (tmp_path / "tok").mkdir()
    zh_tokenizer.save(tmp_path / "tok")
    sharded_losses, sharded = _two_ranks(tmp_path / "fsdp", zh_shards, tmp_path / "tok", "fsdp", 3, 3)
    single_losses, single = _run(tmp_path / "single", zh_shards, zh_tokenizer, "single", 3, 3, False)
    assert max(abs(a - b) for a, b in zip(sharded_losses, single_losses, strict=True)) < 1e-5
    _assert_same(single, sharded)
    # the sharded run's checkpoint is an ordinary model folder with whole tensors
    from lmforge.checkpoint import load_model

    assert load_model(tmp_path / "fsdp" / "checkpoints" / "step-0000003") is not None


def test_sharded_checkpoints_resume_on_another_world_size(zh_tokenizer: Tokenizer, zh_shards: TokenShards,
                                                          tmp_path: Path) -> None:
    (tmp_path / "tok").mkdir()
    zh_tokenizer.save(tmp_path / "tok")
    straight_losses, straight = _run(tmp_path / "straight", zh_shards, zh_tokenizer, "single", 4, 4, False)
    # saved by 2 FSDP ranks, resumed by 1 process
    first, _ = _two_ranks(tmp_path / "two-then-one", zh_shards, tmp_path / "tok", "fsdp", 2, 4)
    second, resumed = _run(tmp_path / "two-then-one", zh_shards, zh_tokenizer, "single", 4, 4, True)
    assert max(abs(a - b) for a, b in zip(first + second, straight_losses, strict=True)) < 1e-5
    _assert_same(straight, resumed)
    # saved by 1 process, resumed by 2 FSDP ranks
    first, _ = _run(tmp_path / "one-then-two", zh_shards, zh_tokenizer, "single", 2, 4, False)
    second, resumed = _two_ranks(tmp_path / "one-then-two", zh_shards, tmp_path / "tok", "fsdp", 4, 4, resume=True)
    assert max(abs(a - b) for a, b in zip(first + second, straight_losses, strict=True)) < 1e-5
    _assert_same(straight, resumed)


def test_elastic_run_survives_a_killed_worker(zh_tokenizer: Tokenizer, zh_shards: TokenShards, tmp_path: Path) -> None:
    """torchrun --nnodes 1:2 --max-restarts 1: rank 1 is killed after step 3; the restarted
    group resumes from the step-2 checkpoint and ends with the uninterrupted run's weights."""
    import subprocess
    import sys

    (tmp_path / "tok").mkdir()
    zh_tokenizer.save(tmp_path / "tok")
    folder = tmp_path / "elastic"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc_per_node", "2",
               "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
               "--rdzv-conf", "last_call_timeout=1", "-m", "tests.train.elastic_worker", "--folder", str(folder),
               "--shards", str(zh_shards.folder), "--tokenizer", str(tmp_path / "tok"), "--steps", "6",
               "--kill-at", "3"]
    done = subprocess.run(command, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (folder / "resumed-at-2").exists()  # the group really died and came back
    elastic = torch.load(folder / "params.pt", weights_only=True)
    trainer = Trainer(make_objective(zh_tokenizer), make_loader(zh_shards, zh_tokenizer, MICRO),
                      TrainConfig(steps=6, batch_size=BATCH, micro_batch_size=MICRO, lr=1e-3, warmup_steps=1,
                                  precision="fp32", eps=1e-6, log_every=1), tmp_path / "straight",
                      tokenizer=zh_tokenizer, progress=False)
    trainer.fit()
    _assert_same({k: v.detach() for k, v in trainer.objective.state_dict().items()}, elastic)

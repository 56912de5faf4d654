"""Training checkpoints: everything needed to continue a run exactly.

    RUN_DIR/checkpoints/step-0000100/
        model.safetensors, config.json, tokenizer.json ...   (an lmforge model folder)
        objective.safetensors       extra heads of the objective (e.g. the SOP head)
        optimizer/                  optimizer state by parameter name (torch.distributed.checkpoint:
                                    written by any number of ranks, read by any number)
        trainer_state.pt            step, RNG state, loader state; plain tensors and numbers,
                                    read with weights_only=True
    RUN_DIR/checkpoints/latest.json -> {"step": 100, "path": "step-0000100"}
    RUN_DIR/checkpoints/best.json   -> the best evaluation so far

Each checkpoint folder is written under a temporary name and renamed, then latest.json
is replaced atomically: a process killed at any moment leaves the previous checkpoint
complete and pointed to.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint import write_model_files
from lmforge.errors import CorruptFileError, DiskFullError
from lmforge.fileio import atomic_directory, load_tensors, read_json, save_tensors, write_json
from lmforge.objectives.base import Objective
from lmforge.tokenizer import Tokenizer
from lmforge.train.dist import Distributed
from lmforge.train.strategy import Strategy


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: Path,
    step: int,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    tokenizer: Tokenizer | None,
    run_config: dict[str, Any],
    keep_last: int = 2,
    strategy: Strategy | None = None,
) -> Path:
    """Write checkpoint ``step``, point latest.json at it, prune old ones (never the best).

    Every rank calls it under torchrun: the optimizer state goes through
    torch.distributed.checkpoint (each rank writes its part), the full weights through
    rank 0, which then renames the staged folder into place."""
    strategy = strategy or Strategy("single", Distributed(), torch.device("cpu"))
    folder = checkpoint_dir(run_dir) / f"step-{step:07d}"
    staging = checkpoint_dir(run_dir) / f".step-{step:07d}.staging"
    full_state = strategy.model_state(objective)  # collective when sharded
    try:
        _write_checkpoint(run_dir, step, objective, optimizer, state, tokenizer, run_config, keep_last, strategy,
                          full_state, folder, staging)
    except OSError as error:
        if error.errno != errno.ENOSPC and not isinstance(error, DiskFullError):
            raise
        free = shutil.disk_usage(checkpoint_dir(run_dir)).free
        needed = 3 * sum(t.numel() * t.element_size() for t in full_state.values())  # weights + two AdamW moments
        raise DiskFullError(f"no space left on the device of {checkpoint_dir(run_dir)} while saving step {step}: a "
                            f"checkpoint needs about {needed / 2**20:,.0f} MB, {free / 2**20:,.0f} MB are free; the "
                            "previous checkpoint is intact. Free space (or lower train.keep_last) and resume") from None
    return folder


def _write_checkpoint(run_dir: Path, step: int, objective: Objective, optimizer: torch.optim.Optimizer,
                      state: dict[str, Any], tokenizer: Tokenizer | None, run_config: dict[str, Any], keep_last: int,
                      strategy: Strategy, full_state: dict[str, torch.Tensor], folder: Path, staging: Path) -> None:
    dist = strategy.dist
    if dist.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    try:
        strategy.save_optimizer(objective, optimizer, staging / "optimizer")
        dist.barrier()
        if dist.is_main:
            with atomic_directory(folder) as tmp:
                model_state = {k[len("model."):]: v for k, v in full_state.items() if k.startswith("model.")}
                write_model_files(objective.model, tmp, tokenizer, {"run_config": run_config}, state=model_state)
                extra = {k: v for k, v in full_state.items() if not k.startswith("model.")}
                if extra:
                    save_tensors(extra, tmp / "objective.safetensors")
                torch.save({"step": step, **state}, tmp / "trainer_state.pt")
                os.replace(staging / "optimizer", tmp / "optimizer")
            write_json(checkpoint_dir(run_dir) / "latest.json", {"step": step, "path": folder.name})
            prune(run_dir, keep_last)
    finally:
        if dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()


def export_model(run_dir: Path, add: Callable[[Path, Path], None] | None = None) -> Path:
    """RUN/model from the best (else the latest) checkpoint: its model files (no trainer or
    optimizer state); ``add(checkpoint, folder)`` writes what a recipe adds (a task head)."""
    checkpoints = checkpoint_dir(run_dir)
    pointer = checkpoints / ("best.json" if (checkpoints / "best.json").exists() else "latest.json")
    source = checkpoints / read_json(pointer)["path"]
    with atomic_directory(run_dir / "model") as tmp:
        for item in source.iterdir():
            if item.is_file() and item.name not in ("trainer_state.pt", "objective.safetensors"):
                shutil.copy2(item, tmp / item.name)
        if add is not None:
            add(source, tmp)
    return run_dir / "model"


def mark_best(run_dir: Path, step: int, metric: str, value: float) -> None:
    write_json(checkpoint_dir(run_dir) / "best.json", {"step": step, "path": f"step-{step:07d}", "metric": metric,
                                                       "value": value})


def prune(run_dir: Path, keep_last: int) -> None:
    folder = checkpoint_dir(run_dir)
    best = read_json(folder / "best.json")["path"] if (folder / "best.json").exists() else None
    steps = sorted(p for p in folder.glob("step-*") if p.is_dir())
    for old in steps[: max(0, len(steps) - keep_last)]:
        if old.name != best:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = checkpoint_dir(run_dir) / "latest.json"
    if not pointer.exists():
        return None
    folder = checkpoint_dir(run_dir) / read_json(pointer)["path"]
    if not (folder / "trainer_state.pt").exists():
        raise CorruptFileError(f"{pointer} points to {folder}, which is incomplete")
    return folder


def load_checkpoint(folder: Path, objective: Objective, optimizer: torch.optim.Optimizer,
                    strategy: Strategy | None = None) -> dict[str, Any]:
    """Restore model, extra heads and optimizer in place (every rank, any world size);
    return the trainer state."""
    from lmforge.weights import check_state

    strategy = strategy or Strategy("single", Distributed(), torch.device("cpu"))
    tensors = load_tensors(folder / "model.safetensors")
    expected = {k[len("model."):]: v for k, v in objective.state_dict().items() if k.startswith("model.")}
    check_state(expected, tensors, str(folder))
    full = {f"model.{k}": v for k, v in tensors.items()}
    if (folder / "objective.safetensors").exists():
        full.update(load_tensors(folder / "objective.safetensors"))
    strategy.load_model_state(objective, full)
    try:
        state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, damaged, or carrying code that weights_only refuses to run
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise CorruptFileError(f"{folder / 'trainer_state.pt'}: not a readable training state ({reason}); it was "
                               f"never executed. Delete {folder.name} to resume from an earlier checkpoint") from None
    if "optimizer" in state:  # written before optimizer state moved to torch.distributed.checkpoint
        optimizer.load_state_dict(state.pop("optimizer"))
    else:
        strategy.load_optimizer(objective, optimizer, folder / "optimizer")
    return state


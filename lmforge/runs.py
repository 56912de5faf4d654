"""Run folders are owned: one run at a time, never mixed with an earlier one.

    with claim_run_folder(run_dir, resume=False, overwrite=False):
        ...  # every check first; files are written only once they have passed

* A lock (``RUN/.lock``, an ``flock`` holding pid, host and start time) keeps a second run
  out while the first is alive; the kernel drops it when the holder dies, so a stale lock
  from a killed run never blocks the next one.
* A folder that already holds a run (a config, checkpoints, metrics, a final model) is not
  trained into again without ``resume`` (continue it) or ``overwrite`` (move it aside to
  ``RUN.old-YYYYmmdd-HHMMSS``, then start afresh). Curves never mix two runs.
* ``resume`` into a folder with nothing to resume from is an error, not a silent fresh start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from lmforge.errors import LmforgeError

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "model", "results.json")


class RunFolderError(LmforgeError):
    """The run folder is held by another run, or holds a run that this one would mix into."""


def describe_run(folder: Path) -> str | None:
    """What run a folder holds ("a finished run", "a partial run ...") or None when it holds none."""
    if not folder.is_dir():
        return None
    present = [m for m in RUN_MARKERS if (folder / m).exists()]
    if not present:
        return None
    if (folder / "model").exists() or (folder / "results.json").exists():
        return "a finished run (model/ is there)"
    latest = folder / "checkpoints" / "latest.json"
    if latest.exists():
        with contextlib.suppress(ValueError, OSError, KeyError):
            return f"a partial run (checkpoint at step {json.loads(latest.read_text())['step']})"
    return f"a partial run ({', '.join(present)})"


def has_checkpoint(folder: Path) -> bool:
    return (folder / "checkpoints" / "latest.json").exists()


@contextlib.contextmanager
def claim_run_folder(folder: str | Path, resume: bool | str = False, overwrite: bool = False, is_main: bool = True,
                     restarted: bool = False) -> Iterator[Path]:
    """Own ``folder`` for the block (see the module docstring). Non-main ranks of a
    torchrun group share their rank 0's claim. ``resume="auto"`` (curves, pipelines) and
    ``restarted`` (an elastic restart) continue when there is a checkpoint and start afresh
    when there is none."""
    folder = Path(folder)
    if resume == "auto":
        resume, restarted = False, True
    if not is_main:
        yield folder
        return
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: continue the run, or move it aside")
    existing = describe_run(folder)
    if resume and not restarted and not has_checkpoint(folder):
        where = f"it holds {existing}" if existing else "it holds no run"
        raise RunFolderError(f"--resume: {folder} has no checkpoint to resume from ({where}); drop --resume to start")
    if existing and not resume and not restarted:
        if not overwrite:
            raise RunFolderError(f"{folder} already holds {existing}; pass --resume to continue it, --overwrite to "
                                 f"move it aside and start afresh, or choose another --output")
        _refuse_if_locked(folder)
        aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(folder, aside)
        print(f"moved the earlier run aside to {aside}")
    folder.mkdir(parents=True, exist_ok=True)
    with _lock(folder):
        yield folder


def _refuse_if_locked(folder: Path) -> None:
    with _lock(folder, record=False):  # the old run's lock file stays as it was
        pass


@contextlib.contextmanager
def _lock(folder: Path, record: bool = True) -> Iterator[None]:
    path = folder / ".lock"
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunFolderError(f"{folder} is in use by a running job ({holder}); wait for it, or choose another "
                                 "--output") from None
        if record:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
            handle.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()

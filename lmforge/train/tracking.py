"""Run tracking: metrics.jsonl, TensorBoard, Weights & Biases, MLflow, and the report.

Every logged record is one JSON line in ``RUN_DIR/metrics.jsonl`` ({"step", "split",
...metrics}) and the same scalars in each tracker of ``train.trackers``:

    tensorboard   RUN_DIR/tensorboard (the default)
    wandb         RUN_DIR/wandb, offline unless WANDB_MODE says otherwise (no network needed;
                  ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later)
    mlflow        a local file store, RUN_DIR/mlruns, or MLFLOW_TRACKING_URI when set

``report(RUN_DIR)`` draws the curves to ``RUN_DIR/curves.png`` and a markdown summary.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.fileio import save_figure, write_text

TRACKERS = ("tensorboard", "wandb", "mlflow")


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lmforge"), name=run_dir.name, dir=str(run_dir),
                              config=config, mode=os.environ.get("WANDB_MODE", "offline"))  # type: ignore[arg-type]

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"file:{(run_dir / 'mlruns').resolve()}"
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a local file store is what we want here
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name("lmforge")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("lmforge")
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        for section, values in config.items():
            for key, value in (values.items() if isinstance(values, dict) else [("value", values)]):
                self.client.log_param(self.run_id, f"{section}.{key}", str(value)[:500])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.client.log_metric(self.run_id, key, value, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class RunLogger:
    """Appends metrics to metrics.jsonl and to each tracker; a no-op on non-main ranks."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, trackers: Sequence[str] = ("tensorboard",),
                 config: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.trackers: list[Any] = []
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            self.trackers = [_BACKENDS[name](self.run_dir, config or {}) for name in trackers]

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": round(time.time(), 3),
                  **{k: _json_number(v) for k, v in metrics.items()}}
        self.handle.write(json.dumps(record, allow_nan=False) + "\n")  # strict JSON: NaN/inf become null
        self.handle.flush()
        scalars = {f"{split}/{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if scalars:
            for tracker in self.trackers:
                tracker.log(step, scalars)

    def close(self) -> None:
        if self.enabled:
            self.handle.close()
            for tracker in self.trackers:
                tracker.close()


def _json_number(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        from lmforge.errors import DataError

        raise DataError(f"{path} not found: is {run_dir} a run folder?")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def report(run_dir: str | Path) -> Path:
    """Draw loss / perplexity / accuracy curves of a run to ``curves.png``; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    keys = [k for k in ("loss", "perplexity", "mlm_accuracy", "clm_accuracy", "pair_accuracy", "accuracy", "macro_f1",
                        "micro_f1", "entity_f1", "f1", "auc", "pearson") if any(k in r for r in records)][:5]
    figure, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for axis, key in zip(axes[0], keys, strict=True):
        for split, style in (("train", "-"), ("eval", "o-")):
            points = [(r["step"], r[key]) for r in records if r["split"] == split and r.get(key) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, style, label=split, markersize=3)
        axis.set_title(key)
        axis.set_xlabel("step")
        if key in ("loss", "perplexity"):
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    out = Path(run_dir) / "curves.png"
    save_figure(figure, out, dpi=110)
    plt.close(figure)
    evals = [r for r in records if r["split"] == "eval"]
    lines = ["| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for record in evals:
        cells = [f"{record[k]:.4g}" if record.get(k) is not None else "" for k in keys]
        lines.append(f"| {record['step']} | " + " | ".join(cells) + " |")
    write_text(Path(run_dir) / "report.md", f"# Run {Path(run_dir).name}\n\n![curves](curves.png)\n\n"
                                            + "\n".join(lines) + "\n")
    return out

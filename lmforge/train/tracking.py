"""Run tracking: metrics.jsonl, TensorBoard events, and the report.

Every logged record is one JSON line in ``RUN_DIR/metrics.jsonl`` ({"step", "split",
...metrics}) and the same scalars in TensorBoard (``RUN_DIR/tensorboard``).
``report(RUN_DIR)`` draws the curves to ``RUN_DIR/curves.png`` and a markdown summary.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from lmforge.fileio import save_figure, write_text


class RunLogger:
    """Appends metrics to metrics.jsonl and TensorBoard; a no-op on non-main ranks."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.writer = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": round(time.time(), 3),
                  **{k: _json_number(v) for k, v in metrics.items()}}
        self.handle.write(json.dumps(record, allow_nan=False) + "\n")  # strict JSON: NaN/inf become null
        self.handle.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.handle.close()
            if self.writer is not None:
                self.writer.close()


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

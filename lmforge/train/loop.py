"""One training loop for every stage (pretraining, continued pretraining, fine-tuning).

A step: pull ``accumulation`` micro-batches, let the objective prepare them (labels,
masking) and count targets per loss term, sum those counts over micro-batches and
ranks, then backward each micro-batch's loss *sum* divided by the step-wide count. So
k micro-batches give the same update as one k-times larger batch, and N ranks the same
as one process with the same global batch.

Randomness is a function of (seed, step, global row), never of how many draws happened
before: a resumed run, another micro-batch size, or another split across ranks draws the
same masks. The global torch RNG (dropout) is saved in each checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from lmforge.errors import ConfigError, LmforgeError
from lmforge.hardware import (
    Precision,
    autocast_context,
    matmul_peak,
    module_device,
    resolve_device,
    resolve_precision,
    to_device,
)
from lmforge.objectives.base import Objective
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import latest_checkpoint, load_checkpoint, mark_best, save_checkpoint
from lmforge.train.dist import Distributed
from lmforge.train.optim import build_optimizer, schedule_factor
from lmforge.train.strategy import Strategy
from lmforge.train.tracking import TRACKERS, RunLogger

log = logging.getLogger(__name__)


class DivergenceError(LmforgeError):
    """The loss or the gradients became non-finite: the run stopped before that step changed
    any weight, and the last checkpoint (all finite) stays the one to resume or use."""


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by ``Trainer.fit`` after a SIGINT/SIGTERM, once the checkpoint is saved: the
    run is unfinished, so nothing downstream (final model, results, the next run of a
    curve or pipeline) may treat it as done. Resume it with ``--resume``."""


@dataclass
class TrainConfig:
    """How to train. ``batch_size`` is the global batch of one optimizer step (all
    micro-batches, all ranks); ``micro_batch_size`` what one forward pass holds."""

    steps: int = 1000
    batch_size: int = 32
    micro_batch_size: int | None = None  # None: batch_size / world_size (no accumulation)
    lr: float = 5e-4
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: measured per machine (lmforge.hardware)
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps; torchrun: each rank its local GPU
    strategy: Literal["auto", "single", "ddp", "fsdp"] = "auto"  # auto: ddp under torchrun, else single
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 20
    save_every: int = 0  # 0: save only at the end
    keep_last: int = 2
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 = off
    best_metric: str = "loss"  # the evaluation metric that picks the best checkpoint and early-stops
    best_mode: Literal["auto", "min", "max"] = "auto"  # auto: min for loss/perplexity/mse, else max
    layer_lr_decay: float = 1.0  # lr of layer l (of L) is lr * decay^(L + 1 - l); embeddings l = 0
    head_lr: float | None = None  # peak lr of a task head's parameters (head.*), e.g. a CRF; None: lr
    log_every: int = 10
    seed: int = 0
    max_minutes: float | None = None  # stop (and save) after this much wall time
    skip_nonfinite_steps: int = 0  # steps with a non-finite loss or gradient to skip before stopping the run
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # and/or wandb (offline), mlflow (file store)

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "batch_size", "eval_batches", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)}: must be >= 1")
        if self.micro_batch_size is not None and (self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size):
            problems.append(f"micro_batch_size={self.micro_batch_size}: must divide batch_size={self.batch_size}")
        if not math.isfinite(self.lr) or not 0 < self.lr <= 1:
            problems.append(f"lr={self.lr}: must be a number in (0, 1] (AdamW learning rates are around 1e-5..1e-2)")
        unknown = [t for t in self.trackers if t not in TRACKERS]
        if unknown:
            problems.append(f"trackers={self.trackers}: unknown {', '.join(unknown)} (known: {', '.join(TRACKERS)})")
        if self.skip_nonfinite_steps < 0:
            problems.append(f"skip_nonfinite_steps={self.skip_nonfinite_steps}: must be >= 0")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            problems.append(f"warmup_steps={self.warmup_steps}: must be in [0, steps={self.steps}]")
        if self.head_lr is not None and (not math.isfinite(self.head_lr) or not 0 < self.head_lr <= 1):
            problems.append(f"head_lr={self.head_lr}: must be a number in (0, 1] (or null: lr)")
        if not 0 < self.layer_lr_decay <= 1:
            problems.append(f"layer_lr_decay={self.layer_lr_decay}: must be in (0, 1]")
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            problems.append(f"clip_norm={self.clip_norm}: must be > 0 (or null to disable)")
        if problems:
            raise ConfigError(problems, where="train")

    def accumulation(self, world_size: int) -> int:
        micro = self.micro_batch_size or self.batch_size // world_size
        if self.batch_size % (micro * world_size):
            raise ConfigError([f"batch_size={self.batch_size} is not a multiple of micro_batch_size={micro} x "
                               f"world_size={world_size}"], where="train")
        return self.batch_size // (micro * world_size)

    def micro(self, world_size: int) -> int:
        return self.micro_batch_size or self.batch_size // world_size

    def minimise(self) -> bool:
        """Whether a smaller ``best_metric`` is better."""
        if self.best_mode != "auto":
            return self.best_mode == "min"
        return any(word in self.best_metric for word in ("loss", "perplexity", "mse", "error"))


def term_metrics(
    dist: Distributed, sums: dict[str, float], stats: dict[str, float], counts: dict[str, float],
    counts_are_global: bool = True, extra: list[float] | None = None,
) -> tuple[dict[str, float], list[float]]:
    """Per-term loss (and accuracy where the objective counts correct predictions) and
    their total, summed over ranks in one all-reduce; ``extra`` values are summed too."""
    keys = sorted(sums)
    local = [*(sums[k] for k in keys), *(stats.get(f"{k}_correct", 0.0) for k in keys)]
    if not counts_are_global:
        local += [float(counts[k]) for k in keys]
    values = dist.all_reduce_sum(local + list(extra or []))
    n = len(keys)
    totals = values[2 * n : 3 * n] if not counts_are_global else [float(counts[k]) for k in keys]
    metrics: dict[str, float] = {}
    for i, key in enumerate(keys):
        count = max(totals[i], 1.0)
        metrics[f"{key}_loss"] = values[i] / count
        if f"{key}_correct" in stats:
            metrics[f"{key}_accuracy"] = values[n + i] / count
    metrics["loss"] = sum(metrics[f"{k}_loss"] for k in keys)
    return metrics, values[len(local):]


@torch.no_grad()
def evaluate_objective(
    objective: Objective, batches: Iterable[dict[str, torch.Tensor]], max_batches: int, seed: int,
    autocast_dtype: torch.dtype | None = None, dist: Distributed | None = None,
) -> dict[str, float]:
    """Loss, perplexity (of the LM term) and accuracy over at most ``max_batches`` batches;
    masks are drawn from (seed, row), so every evaluation (and every model) sees the same."""
    dist = dist or Distributed()
    objective.eval()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    correct: dict[str, float] = {}
    device = module_device(objective)
    context = autocast_context(autocast_dtype, device)
    for index, batch in enumerate(batches):
        if index >= max_batches:
            break
        rows = batch["input_ids"].shape[0]
        generators = [torch.Generator().manual_seed(step_seed(seed, -1, index * rows + r)) for r in range(rows)]
        batch, batch_counts = objective.prepare(batch, generators)
        batch = to_device(batch, device)
        with context:
            out = objective(batch)
        for key, value in out.loss_sums.items():
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0.0) + batch_counts[key]
        for key, value in out.stats.items():
            correct[key] = correct.get(key, 0.0) + value
    metrics, _ = term_metrics(dist, sums, correct, counts, counts_are_global=False)
    lm = next((k for k in ("mlm", "clm") if k in sums), None)
    if lm:
        metrics["perplexity"] = math.exp(min(metrics[f"{lm}_loss"], 50.0))
    return metrics


def step_seed(seed: int, step: int, row: int) -> int:
    """A seed for one row of one step, independent of everything drawn before."""
    digest = hashlib.blake2b(f"{seed}:{step}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class Trainer:
    """Trains an objective on a resumable loader; evaluates, logs, checkpoints."""

    def __init__(
        self,
        objective: Objective,
        train_loader: Any,
        config: TrainConfig,
        run_dir: str | Path,
        eval_batches: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None,
        tokenizer: Tokenizer | None = None,
        run_config: dict[str, Any] | None = None,
        distributed: Distributed | None = None,
        progress: bool = True,
        on_eval: Callable[[int, dict[str, float]], None] | None = None,
        evaluator: Callable[[], dict[str, float]] | None = None,
        anchor: Any = None,
        hooks: list[Any] | None = None,
    ) -> None:
        self.objective = objective
        self.loader = train_loader
        self.config = config
        self.run_dir = Path(run_dir)
        self.eval_batches = eval_batches
        self.tokenizer = tokenizer
        self.run_config = run_config or {"train": asdict(config)}
        self.dist = distributed or Distributed()
        self.progress = progress and self.dist.is_main
        self.on_eval = on_eval
        self.evaluator = evaluator  # task metrics (fine-tuning) instead of the objective's loss
        self.anchor = anchor  # transfer.regularizers.Anchor: L2-SP / EWC pull towards the start
        # objects with before_step(step) (gradients ready) / after_step(step) / metrics(), e.g. AdaLoRA
        self.hooks = list(hooks or [])
        self.accumulation = config.accumulation(self.dist.world_size)
        self.step = 0
        self.best: float | None = None
        self.evals_without_improvement = 0
        self.nonfinite_steps = 0
        self.stop_requested = False
        torch.manual_seed(config.seed)
        self.device = self.dist.device if self.dist.enabled else resolve_device(config.device)
        self.precision: Precision = resolve_precision(config.precision, self.device)
        self.strategy = Strategy(config.strategy, self.dist, self.device)
        if self.strategy.sharded and (anchor is not None or self.hooks):
            raise ConfigError(["strategy=fsdp does not combine with transfer regularizers (L2-SP/EWC/frozen "
                               "layers) or AdaLoRA yet: use strategy ddp"], where="train")
        self.module: nn.Module = self.strategy.setup(objective)  # before the optimizer: FSDP replaces parameters
        self.optimizer = build_optimizer(objective, config.lr, config.weight_decay, config.beta1, config.beta2,
                                         config.eps, config.layer_lr_decay, config.head_lr)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.needs_scaler else None
        self.logger = RunLogger(self.run_dir, enabled=self.dist.is_main, trackers=config.trackers,
                                config=self.run_config)
        self.autocast_dtype = self.precision.dtype

    # ------------------------------------------------------------------ state
    def resume(self) -> bool:
        """Continue from the latest checkpoint in the run folder, if there is one."""
        folder = latest_checkpoint(self.run_dir)
        if folder is None:
            return False
        state = load_checkpoint(folder, self.objective, self.optimizer, self.strategy)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best = state.get("best")
        self.evals_without_improvement = int(state.get("evals_without_improvement", 0))
        self.loader.load_state_dict({k: int(v) for k, v in state["loader"].items()})
        torch.set_rng_state(state["torch_rng"])
        for hook, saved in zip(self.hooks, state.get("hooks", []), strict=False):
            if saved and hasattr(hook, "load_state_dict"):
                hook.load_state_dict(saved)
        if self.dist.is_main:
            tqdm.write(f"resumed from {folder} at step {self.step}")
        return True

    def save(self) -> Path:
        """Write a checkpoint (every rank calls this: sharded state is gathered collectively)."""
        state = {"loader": self.loader.state_dict(), "torch_rng": torch.get_rng_state(), "best": self.best,
                 "evals_without_improvement": self.evals_without_improvement,
                 "hooks": [h.state_dict() if hasattr(h, "state_dict") else {} for h in self.hooks],
                 "scaler": self.scaler.state_dict() if self.scaler is not None else {}}
        return save_checkpoint(self.run_dir, self.step, self.objective, self.optimizer, state, self.tokenizer,
                               self.run_config, self.config.keep_last, self.strategy)

    # ------------------------------------------------------------------ steps
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self.precision.autocast(self.device)

    def _generators(self, step: int, first_row: int, rows: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(step_seed(self.config.seed, step, first_row + r)) for r in range(rows)]

    def _set_lr(self) -> float:
        factor = schedule_factor(self.step, self.config.steps, self.config.warmup_steps, self.config.schedule,
                                 self.config.min_lr_ratio)
        lr = self.config.lr * factor
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over ``accumulation`` micro-batches (and all ranks)."""
        self.objective.train()
        prepared, totals = [], {}
        for micro in range(self.accumulation):
            loaded = next(batches)
            rows = loaded["input_ids"].shape[0]
            first = (self.dist.rank * self.accumulation + micro) * rows  # global row of this micro-batch
            batch, counts = self.objective.prepare(loaded, self._generators(self.step, first, rows))
            prepared.append(to_device(batch, self.device))
            for key, value in counts.items():
                totals[key] = totals.get(key, 0) + value
        keys = sorted(totals)
        global_counts = dict(zip(keys, self.dist.all_reduce_sum([float(totals[k]) for k in keys]), strict=True))
        lr = self._set_lr()
        sums: dict[str, float] = {}
        stats: dict[str, float] = {}
        tokens = 0
        for index, batch in enumerate(prepared):
            with self.strategy.gradient_sync(self.module, sync=index == len(prepared) - 1):
                with self._autocast():
                    out = self.module(batch)
                loss = sum(out.loss_sums[k] / max(global_counts[k], 1.0) for k in out.loss_sums)
                loss = loss * self.dist.world_size  # DDP and FSDP average gradients over ranks
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            for key, value in out.loss_sums.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            for key, value in out.stats.items():
                stats[key] = stats.get(key, 0.0) + value
            tokens += self.objective.tokens_in(batch)
        extra: dict[str, float] = {}
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # true gradients for the regularizers, hooks and clipping
        if self.anchor is not None:  # once per step, after all micro-batches: exact under accumulation
            self.anchor.add_gradients()
            extra["regularizer"] = self.anchor.value()
        for hook in self.hooks:
            if hasattr(hook, "before_step"):
                hook.before_step(self.step)
        grad_norm = self.strategy.clip_grad_norm(self.objective.parameters(), self.config.clip_norm)
        loss_total = sum(sums.values())
        if self.scaler is None and not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
            return self._skip_nonfinite_step(loss_total, grad_norm, lr)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        for hook in self.hooks:
            if hasattr(hook, "after_step"):
                hook.after_step(self.step)
            if hasattr(hook, "metrics"):
                extra.update(hook.metrics())
        metrics, (total_tokens,) = term_metrics(self.dist, sums, stats, global_counts, extra=[float(tokens)])
        return {"lr": lr, "grad_norm": grad_norm, "tokens": total_tokens, **metrics, **extra}

    def _skip_nonfinite_step(self, loss: float, grad_norm: float, lr: float) -> dict[str, float]:
        """Drop this step's gradients (no weight changes); stop the run once more steps than
        ``skip_nonfinite_steps`` went bad."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        step = self.step + 1
        if self.nonfinite_steps > self.config.skip_nonfinite_steps:
            last = latest_checkpoint(self.run_dir) if self.dist.is_main else None
            kept = f"the last checkpoint, {last}, holds finite weights" if last else "no checkpoint was written yet"
            raise DivergenceError(
                f"training diverged at step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g} (lr {lr:.3g}); the "
                f"step was not applied and {kept}. Lower --train.lr, or skip a few bad steps with "
                f"--train.skip_nonfinite_steps N")
        if self.dist.is_main:
            tqdm.write(f"step {step}: non-finite loss ({loss:.4g}) or gradient norm ({grad_norm:.4g}); step skipped "
                       f"({self.nonfinite_steps} of {self.config.skip_nonfinite_steps} allowed)")
        self.step = step
        return {"lr": lr, "grad_norm": grad_norm, "tokens": 0.0, "loss": loss, "skipped": 1.0}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, perplexity (of the LM term) and accuracy over the evaluation batches, or
        the task metrics of the ``evaluator``."""
        if self.evaluator is not None:
            return self.evaluator()
        if self.eval_batches is None:
            return {}
        return evaluate_objective(self.objective, self.eval_batches(), self.config.eval_batches, self.config.seed,
                                  self.autocast_dtype, self.dist)

    # ------------------------------------------------------------------ run
    def fit(self) -> dict[str, float]:
        """Train to ``config.steps`` (or an early stop, time limit or signal); returns the
        last evaluation metrics."""
        config = self.config
        flops_per_token = self.objective.flops_per_token()
        peak = self._announce_setup()
        start_time = time.perf_counter()
        batches = iter(self.loader)
        bar = tqdm(total=config.steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        last_eval: dict[str, float] = {}
        window = [0.0, time.perf_counter()]  # tokens since the last log, and when that log was
        reason = "steps"
        with self._stop_on_signals():
            try:
                while self.step < config.steps:
                    metrics = self.train_step(batches)
                    bar.update(1)
                    self._log_train(metrics, window, flops_per_token, peak, bar)
                    out_of_time = config.max_minutes is not None and \
                        (time.perf_counter() - start_time) / 60 >= config.max_minutes
                    if out_of_time:
                        reason = "time limit"
                    finished = self.step >= config.steps or self.stop_requested or out_of_time
                    improved_now = False
                    if (config.eval_every and self.step % config.eval_every == 0) or finished:
                        last_eval, improved_now, patience_out = self._evaluate_and_rank()
                        if patience_out:
                            reason, finished = "early stopping", True
                    if (config.save_every and self.step % config.save_every == 0) or finished or improved_now:
                        self.save()
                        if improved_now and self.dist.is_main:
                            mark_best(self.run_dir, self.step, f"eval {config.best_metric}", self.best)  # type: ignore[arg-type]
                    if self.stop_requested:
                        reason = "signal"
                    if finished:
                        break
            finally:
                bar.close()
                self.logger.close()
        if self.dist.is_main:
            tqdm.write(f"stopped at step {self.step} ({reason}); run folder: {self.run_dir}")
        if reason == "signal":
            raise TrainingInterrupted(f"interrupted at step {self.step}; the checkpoint in {self.run_dir} resumes it: "
                                      f"run the same command again with --resume")
        return last_eval

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM finish the current step and save; a second Ctrl-C stops at once."""
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def request_stop(signum: int, _frame: Any) -> None:
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            if self.dist.is_main:
                tqdm.write(f"signal {signum}: finishing this step and saving a checkpoint")

        for sig in previous:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                signal.signal(sig, request_stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(sig, handler)

    def _announce_setup(self) -> float:
        """Print and record device, precision and strategy; returns the MFU peak (FLOP/s)."""
        if not self.dist.is_main:
            return 1.0
        peak = matmul_peak(self.autocast_dtype or torch.float32, self.device.type)
        if self.progress:
            tqdm.write(f"device {self.device}, precision {self.precision.name} ({self.precision.reason}), "
                       f"strategy {self.strategy.name} x{self.dist.world_size}")
        self.logger.log(self.step, "setup", {"device": str(self.device), "precision": self.precision.name,
                                             "precision_reason": self.precision.reason, "strategy": self.strategy.name,
                                             "world_size": self.dist.world_size, "peak_flops": peak})
        return peak

    def _log_train(self, metrics: dict[str, float], window: list[float], flops_per_token: float, peak: float,
                   bar: Any) -> None:
        """Every ``log_every`` steps: tokens/s and MFU over the window, to the log and the bar."""
        window[0] += metrics["tokens"]
        if self.step % self.config.log_every and self.step != self.config.steps:
            return
        metrics["tokens_per_s"] = window[0] / max(time.perf_counter() - window[1], 1e-9)
        metrics["mfu"] = metrics["tokens_per_s"] * flops_per_token / peak
        self.logger.log(self.step, "train", metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}", mfu=f"{metrics['mfu']:.1%}")
        window[0], window[1] = 0.0, time.perf_counter()

    def _evaluate_and_rank(self) -> tuple[dict[str, float], bool, bool]:
        """(metrics, improved on the best so far, early-stopping patience used up)."""
        metrics = self.evaluate()
        if not metrics:
            return metrics, False, False
        self.logger.log(self.step, "eval", metrics)
        if self.on_eval is not None and self.dist.is_main:
            self.on_eval(self.step, metrics)
        name = self.config.best_metric
        if name not in metrics:
            raise ConfigError([f"best_metric={name!r} is not among the evaluation metrics ({', '.join(metrics)})"],
                              where="train")
        improved = self._improved(metrics[name])
        patience = self.config.early_stopping_patience
        return metrics, improved, bool(not improved and patience and self.evals_without_improvement >= patience)

    def _improved(self, value: float) -> bool:
        better = self.best is None or (value < self.best if self.config.minimise() else value > self.best)
        if better:
            self.best = value
            self.evals_without_improvement = 0
            return True
        self.evals_without_improvement += 1
        return False

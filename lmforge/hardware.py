"""Where tensors live and in which precision they compute, chosen for the machine at hand.

Machines differ: an AVX-512 CPU with native bf16 runs bf16 matmuls about 2x faster than
fp32, while an AVX2-only CPU emulates bf16 about 100x slower than fp32. So nothing here
assumes an instruction set. ``precision="auto"`` (the default everywhere) asks a short
probe once per process (a few small matmuls, well under a second) and takes bf16 on a CPU
only where the probe measured it faster; on CUDA it takes bf16 where the GPU supports it,
else fp16 with a gradient scaler; fp32 otherwise.

    device    = resolve_device("auto")            # cuda > mps > cpu; "cuda:1" checked to exist
    precision = resolve_precision("auto", device)  # Precision(name="fp32", reason="...")
    with precision.autocast(device): ...
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError

PrecisionName = Literal["auto", "bf16", "fp16", "fp32"]
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (cuda, else mps, else cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; an
    accelerator that is not there is a ConfigError naming what is."""
    spec = "auto" if spec is None else str(spec)
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError([f"device={spec!r}: expected auto, cpu, cuda, cuda:N or mps"]) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError([f"device={spec!r}: no CUDA device here (this torch build sees none); use cpu or auto"])
        if device.index is not None and device.index >= count:
            raise ConfigError([f"device={spec!r}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})"])
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type == "mps" and not _mps_available():
        raise ConfigError([f"device={spec!r}: MPS (Apple GPU) is not available here; use cpu or auto"])
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError([f"device={spec!r}: expected auto, cpu, cuda, cuda:N or mps"])
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (cpu for a module without any)."""
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device`` (through pinned memory to a GPU, without blocking)."""
    if device.type == "cpu":
        return batch
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.device != device:
            if device.type == "cuda" and value.device.type == "cpu":
                value = value.pin_memory()
            value = value.to(device, non_blocking=True)
        moved[key] = value
    return moved


@dataclass(frozen=True)
class Precision:
    """The precision a run computes in: ``name`` (bf16, fp16, fp32) and why it was chosen."""

    name: Literal["bf16", "fp16", "fp32"]
    reason: str = ""

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: plain fp32)."""
        return DTYPES[self.name]

    @property
    def needs_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
        return self.name == "fp16"

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
        return autocast_context(self.dtype, device)


def autocast_context(dtype: torch.dtype | None, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """Autocast on ``device``'s own type (a no-op for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def resolve_precision(spec: str = "auto", device: torch.device | str = "cpu") -> Precision:
    """The precision for ``spec`` on ``device``: an explicit name is kept (fp16 on a CPU is
    refused: its autocast is slow and unscaled); ``auto`` decides per machine."""
    device = torch.device(device)
    if spec not in PRECISIONS:
        raise ConfigError([f"precision={spec!r}: must be one of {', '.join(PRECISIONS)}"])
    if spec != "auto":
        if spec == "fp16" and device.type == "cpu":
            raise ConfigError(["precision='fp16' on a CPU: use bf16 (where the CPU has it) or fp32, or auto"])
        return Precision(spec, "asked for")  # type: ignore[arg-type]
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", f"{torch.cuda.get_device_name(device)} supports bf16")
        return Precision("fp16", f"{torch.cuda.get_device_name(device)} has no bf16: fp16 with a gradient scaler")
    if device.type == "mps":
        return Precision("fp32", "MPS: fp32")
    speedup = cpu_bf16_speedup()
    if speedup >= 1.15:
        return Precision("bf16", f"the probe measured bf16 matmuls {speedup:.1f}x faster than fp32 on this CPU")
    return Precision("fp32", f"the probe measured bf16 matmuls at {speedup:.2f}x fp32's speed on this CPU"
                             f"{' (no native bf16)' if speedup < 0.5 else ''}")


@functools.cache
def cpu_bf16_speedup(size: int = 256, budget_s: float = 0.03, rounds: int = 3) -> float:
    """fp32 time / bf16 time of a (size x size) linear layer product on this CPU (the
    kernel models run): > 1 where bf16 is faster. The two sides alternate over ``rounds``
    rounds, each side running for ``budget_s / rounds`` and at least 3 times a round
    (unless one product alone takes longer), and the best repetition of each side counts: another process busy on the same
    cores for a moment then slows both sides alike instead of deciding the result (it
    once made one-shot timing pick emulated bf16, 20x slower, on an AVX2 CPU). Emulated
    bf16 stays short too. Cached for the process."""
    generator = torch.Generator().manual_seed(0)
    pairs = {dtype: (torch.randn(size, size, generator=generator).to(dtype),
                     torch.randn(size, size, generator=generator).to(dtype))
             for dtype in (torch.float32, torch.bfloat16)}
    best = {dtype: float("inf") for dtype in pairs}
    for a, b in pairs.values():
        F.linear(a, b)  # warm-up (thread pool, packing)
    for _ in range(rounds):
        for dtype, (a, b) in pairs.items():
            best[dtype] = min(best[dtype], _best_matmul_seconds(a, b, budget_s / rounds))
    return best[torch.float32] / best[torch.bfloat16]


def _best_matmul_seconds(a: torch.Tensor, b: torch.Tensor, budget_s: float, at_least: int = 3) -> float:
    best, started, runs = float("inf"), time.perf_counter(), 0
    while True:
        begin = time.perf_counter()
        F.linear(a, b)
        best = min(best, time.perf_counter() - begin)
        runs += 1
        elapsed = time.perf_counter() - started
        if (runs >= at_least and elapsed > budget_s) or elapsed > 2 * budget_s:  # a slow side stops early
            return best


@functools.cache
def matmul_peak(dtype: torch.dtype = torch.float32, device_type: str = "cpu", budget_s: float = 0.4) -> float:
    """Dense matmul FLOP/s in ``dtype`` on this machine (the MFU denominator), measured once
    per process with the linear-layer kernel: the fastest of the products run in ``budget_s``.
    The matrix grows from 256 while one product takes under 20 ms (to 4096 at most), so a
    slow (emulated) dtype is measured at a small size instead of for minutes. How many
    matrices it draws depends on timing, so it draws them from its own generator."""
    device = torch.device(device_type)
    generator = torch.Generator(device=device).manual_seed(0)  # the global RNG (dropout, masks) stays untouched
    size = 256
    while True:
        a = torch.randn(size, size, device=device, generator=generator).to(dtype)
        b = torch.randn(size, size, device=device, generator=generator).to(dtype)
        F.linear(a, b)
        _synchronize(device)
        start = time.perf_counter()
        F.linear(a, b)
        _synchronize(device)
        one = time.perf_counter() - start
        if one > 0.02 or size >= 4096:
            break
        size *= 2
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < budget_s:  # the fastest product: another process's burst only slows some
        begin = time.perf_counter()
        F.linear(a, b)
        _synchronize(device)
        best = min(best, time.perf_counter() - begin)
    return 2 * size**3 / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_flags() -> list[str]:
    """The CPU features that decide speed here (AVX2, AVX-512, bf16, AMX, VNNI), from
    /proc/cpuinfo where it exists."""
    path = Path("/proc/cpuinfo")
    if not path.exists():
        import platform

        return [platform.processor() or platform.machine()]
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            keep = ("avx", "amx", "vnni", "bf16", "fma")
            return sorted({f for f in flags if any(k in f for k in keep)})
    return []


def cpu_name() -> str:
    path = Path("/proc/cpuinfo")
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def describe_machine() -> dict[str, Any]:
    """What a benchmark table states about the machine it ran on."""
    import os

    return {"cpu": cpu_name(), "cpu_flags": " ".join(cpu_flags()), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}

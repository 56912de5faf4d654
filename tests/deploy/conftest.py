"""Small fine-tuned task runs to compress and export (tiny encoder, a few steps each)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tasks.conftest import ner, pairs, qa, relation, sentiment, tiny_decoder_dir, tiny_encoder_dir, write_jsonl  # noqa: F401  (shared fixtures)
from tests.tasks.helpers import finetune

MAKERS = {"classify": (sentiment, 320), "ner": (ner, 120), "qa": (qa, 60), "relation": (relation, 90),
          "pair-score": (pairs, 30)}


@pytest.fixture(scope="session")
def task_runs(tiny_encoder_dir: Path,  # noqa: F811
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """task -> (run folder, held-out data file); the classifier is trained to learn, the
    others take a few steps (enough for non-trivial heads)."""
    root = tmp_path_factory.mktemp("deploy-runs")
    runs = {}
    for task, (make, count) in MAKERS.items():
        train = write_jsonl(root / f"{task}-train.jsonl", make(count, 1))
        held_out = write_jsonl(root / f"{task}-test.jsonl", make(max(count // 3, 20), 2))
        flags = ["--task", task, "--train", str(train)]
        if task == "classify":
            finetune(tiny_encoder_dir, root / task, *flags, epochs=4)
        else:
            finetune(tiny_encoder_dir, root / task, *flags, "--train.steps", "3")
        runs[task] = (root / task, held_out)
    return runs

"""One result of a classical baseline: a one-row markdown table on stdout and
docs/benchmarks/<name>.json (shared by tfidf_baseline.py and crf_baseline.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def report(name: str, columns: dict[str, Any], result: dict[str, Any]) -> Path:
    """Print ``columns`` (header -> value; floats to 4 places) as a table, write ``result``."""
    cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in columns.values()]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    print("| " + " | ".join(cells) + " |")
    out = Path("docs/benchmarks") / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out

"""Few-shot benchmark (docs/results.md, "Few labels"): plain fine-tuning, SetFit and in-context
SmolLM2 at 8/16/32/64 labelled sentences per class, with the full-data ceiling and zero-shot
SmolLM2 with and without contextual calibration.

    python benchmarks/fewshot.py [--work runs/fewshot] [--seeds 0 1 2]

Data: the UCI labelled sentences (Amazon, IMDb, Yelp; corpus:uci_sentences): 2,409 training
and 295 test sentences, negative / positive. Encoder: MiniLM-L6; decoder: SmolLM2-135M-Instruct.
Finished runs are kept, so an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ["--task", "classify", "--train", "corpus:uci_sentences", "--test", "corpus:uci_sentences",
        "--verbalizers", json.dumps({"0": ["negative"], "1": ["positive"]})]


def main() -> None:
    from lmforge.cli import main as lmforge

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "runs" / "fewshot"))
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    parser.add_argument("--output", default=str(ROOT / "docs" / "results"))
    args = parser.parse_args()
    work, output = Path(args.work), Path(args.output)
    # 10 SetFit rounds (the default is 20) and 3 seeds keep the grid near 35 minutes on 2 cores
    code = lmforge(["fewshot", "curve", *DATA, "--calibrate", "--setfit-iterations", "10",
                    "--methods", "finetune", "setfit", "icl",
                    "--shots", "8", "16", "32", "64", "--seeds", *args.seeds, "--output", str(work / "curve")])
    if code:
        sys.exit(code)
    zero: dict[str, float] = {}
    for name, extra in (("uncalibrated", []), ("calibrated", ["--calibrate"])):
        run = work / f"icl-zero-shot-{name}"
        if not (run / "results.json").exists():
            from lmforge.cli import _smollm2

            code = lmforge(["finetune", *DATA, "--model", str(_smollm2()), "--method", "icl", *extra,
                            "--output", str(run), "--overwrite"])
            if code:
                sys.exit(code)
        zero[name] = json.loads((run / "results.json").read_text())["test"]["accuracy"]
    curve = json.loads((work / "curve" / "curve.json").read_text())
    references = json.loads((work / "curve" / "references" / "curve.json").read_text())
    (output / "fewshot.json").write_text(json.dumps({"curve": curve, "references": references,
                                                     "zero_shot_accuracy": zero}, indent=1) + "\n")
    shutil.copy(work / "curve" / "curve.png", output / "fewshot-curve.png")
    table = (work / "curve" / "curve.md").read_text().replace("![curve](curve.png)", "")
    table += "\n" + (work / "curve" / "references" / "curve.md").read_text().split("\n", 2)[2].replace(
        "![curve](curve.png)", "")
    table += f"\nZero-shot SmolLM2 test accuracy: {zero['uncalibrated']:.4f} uncalibrated, " \
             f"{zero['calibrated']:.4f} calibrated (chance 0.5).\n"
    (output / "fewshot-tables.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

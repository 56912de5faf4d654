"""Few-shot benchmark (docs/results.md, "Few labels"): plain fine-tuning, SetFit and in-context
SmolLM2 at 8/16/32/64 labelled sentences per class, with the full-data ceiling and zero-shot
SmolLM2 with and without contextual calibration.

    python benchmarks/fewshot.py [--work runs/fewshot] [--seeds 0 1 2 3 4]

Data: the UCI labelled sentences (Amazon, IMDb, Yelp; corpus:uci_sentences): 2,409 training
and 295 test sentences, negative / positive. Encoder: MiniLM-L6; decoder: SmolLM2-135M-Instruct.
Finished runs are kept, so an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ["--task", "classify", "--train", "corpus:uci_sentences", "--test", "corpus:uci_sentences",
        "--verbalizers", json.dumps({"0": ["negative"], "1": ["positive"]})]


def main() -> None:
    from lmforge.cli import main as lmforge

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "runs" / "fewshot"))
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2", "3", "4"])
    parser.add_argument("--output", default=str(ROOT / "docs" / "results"))
    args = parser.parse_args()
    work, output = Path(args.work), Path(args.output)
    # every method with its defaults: SetFit 20 rounds; SmolLM2 zero-shot prompts with label
    # biases fitted to the shots (demonstrations cost it 10-30 points here: docs/results.md)
    for methods, folder, extra in ((["finetune", "setfit"], "curve", []), (["icl"], "curve-icl", ["--no-references"])):
        code = lmforge(["fewshot", "curve", *DATA, "--methods", *methods, "--shots", "8", "16", "32", "64",
                        "--seeds", *args.seeds, "--output", str(work / folder), *extra])
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
    from lmforge.recipes.curves import plot_curve, summarise, write_table

    runs = [r for folder in ("curve", "curve-icl") for r in json.loads((work / folder / "curve.json").read_text())["runs"]]
    references = json.loads((work / "curve" / "references" / "curve.json").read_text())
    summary = summarise(runs)
    (output / "fewshot.json").write_text(json.dumps({"runs": runs, "summary": summary, "references": references,
                                                     "zero_shot_accuracy": zero}, indent=1) + "\n")
    plot_curve(output / "fewshot-curve.png", summary)
    write_table(work / "fewshot.md", summary, runs, "shots per label")
    table = (work / "fewshot.md").read_text().replace("![curve](curve.png)", "")
    table += "\n" + (work / "curve" / "references" / "curve.md").read_text().split("\n", 2)[2].replace(
        "![curve](curve.png)", "")
    table += f"\nZero-shot SmolLM2 test accuracy: {zero['uncalibrated']:.4f} uncalibrated, " \
             f"{zero['calibrated']:.4f} calibrated (chance 0.5).\n"
    (output / "fewshot-tables.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

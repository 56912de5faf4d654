"""GPU check: what a CUDA machine must show before lmforge's "same code on GPUs" is believed.

    make gpu-check                      # or: python benchmarks/gpu_check.py [--compile] [--steps 20]

1. parity: tiny BERT, GPT-2 and Llama give the same outputs on CUDA as on the CPU (fp32);
2. bf16 autocast + SDPA: a masked-LM and a causal-LM training step run, losses close to fp32;
3. training through the Trainer on CUDA (device auto, precision auto), a checkpoint written
   on the GPU and resumed on the CPU with the same next loss;
4. device placement: tests/models/test_devices.py with model and inputs on the GPU (forward
   passes, losses, generation and every adapter, with the default device set to ``meta`` so
   that a tensor made without ``device=`` fails);
5. DDP and FSDP2 (nccl) on every GPU present, through torchrun, equal to one process; with
   one GPU, a process group of one (the nccl, DDP and fully_shard code paths, sharded
   checkpoint included, on the GPU; nothing across GPUs);
6. optional ``torch.compile`` of the encoder (--compile);
7. training tokens/s, peak memory and MFU in bf16 against transformers on the same GPU:
   BERT-base masked LM and SmolLM2-135M causal LM (MFU against the bf16 peak measured on
   8192-square products).

It prints one report and writes it to --out (docs/gpu-check.md). Without CUDA it says so
and exits 0, unless ``--device cpu`` asks for a dry run of the same checks on the CPU (to
check the script itself before a GPU machine's time is spent on it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


DEVICE = torch.device("cuda")  # --device cpu: a dry run of the script on the CPU


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def parity() -> list[str]:
    from lmforge.models import Decoder, Encoder, preset

    lines = []
    for name in ("bert-tiny", "gpt2-tiny", "llama-tiny"):
        torch.manual_seed(0)
        cls = Encoder if name.startswith("bert") else Decoder
        model = cls(preset(name, vocab_size=101, max_position_embeddings=64)).eval()  # type: ignore[arg-type]
        ids = torch.randint(5, 101, (3, 17))
        mask = torch.ones_like(ids)
        mask[0, :5] = 0 if cls is Decoder else 1
        if cls is Encoder:
            mask[1, 12:] = 0
        with torch.no_grad():
            cpu = model(ids, mask)
            gpu = model.to(DEVICE)(ids.to(DEVICE), mask.to(DEVICE)).cpu()
        error = float((cpu - gpu)[mask.bool()].abs().max())
        lines.append(f"| parity {name} | max abs diff {DEVICE.type} vs CPU (fp32) | {error:.2e} | "
                     f"{'ok' if error < 1e-4 else 'FAIL'} |")
    return lines


def bf16_steps() -> list[str]:
    from lmforge.models import Decoder, MaskedLM, preset
    from lmforge.objectives import CausalLMObjective, MaskedLMObjective

    lines = []
    for kind in ("mlm", "clm"):
        losses = {}
        for dtype in (None, torch.bfloat16):
            torch.manual_seed(0)
            if kind == "mlm":
                objective = MaskedLMObjective(MaskedLM(preset("bert-mini", vocab_size=1000)), 3, [0, 1, 2, 3])  # type: ignore[arg-type]
            else:
                objective = CausalLMObjective(Decoder(preset("llama-mini", vocab_size=1000)))  # type: ignore[arg-type]
            objective.to(DEVICE)
            ids = torch.randint(5, 1000, (8, 128), generator=torch.Generator().manual_seed(1))
            batch, _ = objective.prepare({"input_ids": ids}, [torch.Generator().manual_seed(r) for r in range(8)])
            batch = {k: v.to(DEVICE) for k, v in batch.items()}
            with torch.autocast(DEVICE.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = objective(batch)
            loss = sum(out.loss_sums.values())
            loss.backward()  # type: ignore[union-attr]
            losses[str(dtype)] = float(loss.detach()) / max(int((batch.get("labels", batch.get("targets")) != -100).sum()), 1)
        fp32, bf16 = losses["None"], losses["torch.bfloat16"]
        ok = abs(fp32 - bf16) / fp32 < 0.02
        lines.append(f"| bf16 + SDPA {kind} step | loss fp32 / bf16 | {fp32:.4f} / {bf16:.4f} | {'ok' if ok else 'FAIL'} |")
    return lines


def trainer_on_gpu(folder: Path) -> list[str]:
    from lmforge.data.loader import PackedLoader
    from lmforge.data.shards import TokenShards, prepare_shards
    from lmforge.models import MaskedLM, preset
    from lmforge.objectives import MaskedLMObjective
    from lmforge.tokenizer import train_wordpiece
    from lmforge.train import TrainConfig, Trainer

    texts = [f"sentence number {i} says {' '.join(str(j * i % 97) for j in range(30))}" for i in range(3000)]
    tokenizer = train_wordpiece(texts, 2000, show_progress=False)
    prepare_shards(lambda: iter(texts), tokenizer, folder / "shards", workers=1, progress=False)
    shards = TokenShards(folder / "shards")
    special = [tokenizer.token_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")]

    def trainer(device: str, run: Path, steps: int, precision: str = "fp32") -> Trainer:
        torch.manual_seed(0)
        # no dropout: its masks come from the CUDA generator on the GPU and the CPU one on the CPU
        model = MaskedLM(preset("bert-tiny", vocab_size=tokenizer.vocab_size, hidden_dropout=0.0, attention_dropout=0.0))  # type: ignore[arg-type]
        objective = MaskedLMObjective(model, tokenizer.token_id("[MASK]"), special)  # type: ignore[arg-type]
        loader = PackedLoader(shards, 64, 16, seed=1, cls_id=tokenizer.token_id("[CLS]"), sep_id=tokenizer.token_id("[SEP]"))
        config = TrainConfig(steps=steps, batch_size=16, lr=1e-3, log_every=1, device=device,
                             precision=precision)  # type: ignore[arg-type]
        return Trainer(objective, loader, config, run, tokenizer=tokenizer, progress=False)

    gpu = trainer("auto" if DEVICE.type == "cuda" else "cpu", folder / "run", 6)
    batches = iter(gpu.loader)
    for _ in range(4):
        gpu.train_step(batches)
    gpu.save()
    gpu_next = gpu.train_step(batches)["loss"]
    cpu = trainer("cpu", folder / "run", 6)
    cpu.resume()
    cpu_next = cpu.train_step(iter(cpu.loader))["loss"]
    ok = gpu.device.type == DEVICE.type and abs(gpu_next - cpu_next) < 1e-4
    lines = [f"| Trainer on {gpu.device}, checkpoint resumed on CPU | next loss {gpu.device.type} / CPU | "
             f"{gpu_next:.5f} / {cpu_next:.5f} | {'ok' if ok else 'FAIL'} |"]
    device = "auto" if DEVICE.type == "cuda" else "cpu"
    # auto: bf16 where the GPU has it; fp16 (GPUs only) runs with a gradient scaler
    for precision in ("auto", "fp16") if DEVICE.type == "cuda" else ("auto",):
        run = trainer(device, folder / f"run-{precision}", 8, precision)
        batches = iter(run.loader)
        losses = [run.train_step(batches)["loss"] for _ in range(8)]
        scaled = run.scaler is not None
        ok = all(map(math.isfinite, losses)) and losses[-1] < losses[0] and (scaled == (run.precision.name == "fp16"))
        lines.append(f"| Trainer precision {precision} | chosen; gradient scaler; loss step 1 -> 8 | {run.precision.name} "
                     f"({run.precision.reason}); {'yes' if scaled else 'no'}; {losses[0]:.3f} -> {losses[-1]:.3f} | "
                     f"{'ok' if ok else 'FAIL'} |")
    return lines


def device_placement() -> list[str]:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           "tests/models/test_devices.py"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "LMFORGE_TEST_DEVICE": DEVICE.type})
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    if done.returncode != 0:
        failures = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR", "E "))][:4]
        summary += " — " + "; ".join(failures)
    return [f"| no tensor off the inputs' device (tests/models/test_devices.py, default device meta) | "
            f"forward, losses, generation, 7 adapter methods on {DEVICE.type} | {summary.replace('|', '/')} | "
            f"{'ok' if done.returncode == 0 else 'FAIL'} |"]


def distributed(folder: Path) -> list[str]:
    count = torch.cuda.device_count() if DEVICE.type == "cuda" else 1
    script = folder / "dist_worker.py"
    script.write_text(DIST_WORKER)
    lines = []
    for strategy in ("ddp", "fsdp"):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(count),
                   str(script), str(folder / strategy), strategy, DEVICE.type]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        backend = "nccl" if DEVICE.type == "cuda" else "gloo"
        name = f"{strategy.upper()} {backend} x{count}" + (" (a group of one: one GPU)" if count == 1 else "")
        if done.returncode != 0:
            lines.append(f"| {name} | run | failed: {done.stderr[-300:]!r} | FAIL |".replace("\n", " "))
            continue
        result = json.loads((folder / strategy / "result.json").read_text())
        ok = result["diff"] < 1e-4 and result["resume_diff"] < 1e-5
        lines.append(f"| {name} == 1 process; sharded checkpoint resumed | max param diff after 3 steps; "
                     f"next-loss diff after resume | {result['diff']:.2e}; {result['resume_diff']:.2e} | "
                     f"{'ok' if ok else 'FAIL'} |")
    return lines


DIST_WORKER = """
import json, os, sys, torch
import torch.distributed as td
from pathlib import Path
from lmforge.models import MaskedLM, preset
from lmforge.objectives import MaskedLMObjective
from lmforge.train import TrainConfig, Trainer
from lmforge.train.dist import Distributed, setup_distributed

folder, strategy, device = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

class Group(Distributed):  # a process group even of one process: the distributed code paths run
    enabled = property(lambda self: True)

class Loader:  # global batches of 16 rows; each next() is this rank's next micro-batch of one
    def __init__(self, rank, world, micro):
        self.rank, self.micro, self.accumulation, self.batch = rank, micro, 16 // (micro * world), 0
    def state_dict(self): return {"seed": 0, "epoch": 0, "batch": self.batch}
    def load_state_dict(self, state): self.batch = state["batch"]
    def __iter__(self):
        while True:
            rows = torch.randint(5, 1000, (16, 64), generator=torch.Generator().manual_seed(self.batch))
            self.batch += 1
            for m in range(self.accumulation):
                first = (self.rank * self.accumulation + m) * self.micro
                yield {"input_ids": rows[first:first + self.micro]}

world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
if world == 1:
    if device == "cuda":
        torch.cuda.set_device(0)
    td.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    group = Group(0, 1, torch.device(device, 0) if device == "cuda" else torch.device("cpu"))
else:
    group = setup_distributed(device)

def trainer(d, run, steps=3):
    torch.manual_seed(0)
    objective = MaskedLMObjective(MaskedLM(preset("bert-tiny", vocab_size=1000, hidden_dropout=0.0,
                                                  attention_dropout=0.0)), 3, [0, 1, 2, 3])
    micro = 16 if not d.enabled else 8 // d.world_size if d.world_size <= 8 else 1  # the group accumulates
    config = TrainConfig(steps=steps, batch_size=16, micro_batch_size=micro, lr=1e-3, precision="fp32",
                         device=device, strategy=strategy if d.enabled else "single")
    return Trainer(objective, Loader(d.rank, d.world_size, micro), config, run, distributed=d, progress=False)

many = trainer(group, folder / "many")
batches = iter(many.loader)
for _ in range(3):
    many.train_step(batches)
params = {k: v.detach().cpu() for k, v in many.strategy.model_state(many.objective).items()}
many.save()
next_loss = many.train_step(batches)["loss"]
again = trainer(group, folder / "many")
again.resume()
resumed_loss = again.train_step(iter(again.loader))["loss"]
if group.is_main:
    one = trainer(Distributed(device=group.device), folder / "one")
    b = iter(one.loader)
    for _ in range(3):
        one.train_step(b)
    ref = {k: v.detach().cpu() for k, v in one.objective.state_dict().items()}
    diff = max(float((params[k] - ref[k]).abs().max()) for k in ref)
    (folder / "result.json").write_text(json.dumps({"diff": diff, "resume_diff": abs(next_loss - resumed_loss)}))
td.barrier()
td.destroy_process_group()
"""


def compiled() -> list[str]:
    from lmforge.models import Encoder, preset

    torch.manual_seed(0)
    model = Encoder(preset("bert-mini", vocab_size=1000)).to(DEVICE).eval()  # type: ignore[arg-type]
    ids = torch.randint(5, 1000, (16, 128), device=DEVICE)
    with torch.no_grad():
        eager = model(ids)
        fast = torch.compile(model)
        out = fast(ids)
        _sync()
        start = time.perf_counter()
        for _ in range(20):
            fast(ids)
        _sync()
        compiled_s = (time.perf_counter() - start) / 20
        start = time.perf_counter()
        for _ in range(20):
            model(ids)
        _sync()
        eager_s = (time.perf_counter() - start) / 20
    error = float((eager - out).abs().max())
    return [f"| torch.compile encoder (bert-mini, 16 x 128, inference) | max diff; speed-up | "
            f"{error:.1e}; {eager_s / compiled_s:.2f}x | {'ok' if error < 1e-3 else 'FAIL'} |"]


def bf16_peak() -> float:
    """Dense bf16 matmul FLOP/s on 8192-square products, timed over ten after warm-up (on a GPU
    a 4096 product is short enough that launch and synchronisation show in one product's time)."""
    if DEVICE.type != "cuda":
        from lmforge.hardware import matmul_peak

        return matmul_peak(torch.bfloat16, "cpu", 0.2)
    size = 8192
    a = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * size**3 / (time.perf_counter() - start)


def versus_transformers(steps: int) -> list[str]:
    """lmforge against transformers on the same GPU, model, batches and optimizer, both in bf16
    autocast: BERT-base masked LM (batch 64 x 512) and SmolLM2-135M causal LM (batch 16 x 2048),
    random initialisation. Each side runs alone; peak memory is reset between them."""
    import transformers

    from lmforge.models import Decoder, MaskedLM, preset
    from lmforge.objectives import CausalLMObjective, MaskedLMObjective
    from lmforge.objectives.mlm import MaskingConfig, mask_tokens
    from lmforge.train.optim import build_optimizer

    big = DEVICE.type == "cuda"
    lines = []
    for task in ("mlm", "clm"):
        if task == "mlm":
            vocab, (rows, length) = 30522, ((64, 512) if big else (2, 64))
            ours = preset("bert-base" if big else "bert-mini", vocab_size=vocab, add_pooler=False)
        else:
            vocab, (rows, length) = 49152, ((16, 2048) if big else (2, 64))
            ours = preset("smollm2-135m", vocab_size=vocab, **({} if big else {"num_layers": 2}))
        generator = torch.Generator().manual_seed(0)
        data = []
        for _ in range(3 + steps):
            ids = torch.randint(1000, vocab, (rows, length), generator=generator)
            if task == "mlm":
                inputs, labels = mask_tokens(ids, 103, vocab, [0, 100, 101, 102, 103], MaskingConfig(), generator)
                data.append({"input_ids": inputs.to(DEVICE), "labels": labels.to(DEVICE)})
            else:
                data.append({"input_ids": ids.to(DEVICE)})
        result = {}
        for side in ("lmforge", "transformers"):
            torch.manual_seed(0)
            if side == "lmforge":
                if task == "mlm":
                    module: torch.nn.Module = MaskedLMObjective(MaskedLM(ours), 103, [0, 100, 101, 102, 103])  # type: ignore[arg-type]
                else:
                    module = CausalLMObjective(Decoder(ours))  # type: ignore[arg-type]
                module.to(DEVICE).train()
                optimizer = build_optimizer(module, 1e-4, 0.01, 0.9, 0.999, 1e-8)
                flops = module.flops_per_token()  # type: ignore[operator]
            else:
                c = ours
                if task == "mlm":
                    config = transformers.BertConfig(vocab_size=vocab, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                                                     num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
                                                     max_position_embeddings=512)
                    module = transformers.BertForMaskedLM(config)
                else:
                    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                                                      num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                                                      intermediate_size=c.intermediate_size, max_position_embeddings=8192,
                                                      tie_word_embeddings=True)
                    module = transformers.LlamaForCausalLM(config)
                module.to(DEVICE).train()
                optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.01)
                attention = getattr(module.config, "_attn_implementation", "?")

            def step(batch: dict[str, torch.Tensor], side: str = side, module: torch.nn.Module = module,
                     optimizer: torch.optim.Optimizer = optimizer, task: str = task) -> None:
                with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                    if side == "transformers":
                        loss = module(input_ids=batch["input_ids"], labels=batch.get("labels", batch["input_ids"])).loss
                    else:
                        prepared = batch if task == "mlm" else {**batch, "targets": batch["input_ids"][:, 1:]}
                        out = module(prepared)
                        count = (batch["labels"] != -100).sum() if task == "mlm" else batch["input_ids"][:, 1:].numel()
                        loss = sum(out.loss_sums.values()) / count
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            for batch in data[:3]:
                step(batch)
            _sync()
            start = time.perf_counter()
            for batch in data[3:]:
                step(batch)
            _sync()
            result[side] = (steps * rows * length / (time.perf_counter() - start),
                            torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else float("nan"))
            del module, optimizer
        (ours_tps, ours_mem), (ref_tps, ref_mem) = result["lmforge"], result["transformers"]
        name = "BERT-base MLM" if task == "mlm" else "SmolLM2-135M CLM"
        lines.append(f"| {name} train vs transformers {transformers.__version__} (attention {attention}), bf16, "
                     f"batch {rows} x {length} | tokens/s lmforge / transformers (ratio); peak GiB; lmforge MFU "
                     f"vs {PEAK[0] / 1e12:.0f} TFLOP/s | {ours_tps:,.0f} / {ref_tps:,.0f} ({ours_tps / ref_tps:.2f}x); "
                     f"{ours_mem:.1f} / {ref_mem:.1f}; {ours_tps * flops / PEAK[0]:.1%} | measured |")
    return lines


PEAK = [0.0]  # the bf16 peak, measured once before the throughput checks


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a dry run of every check on the CPU (nothing is written to docs)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gpu-check.md")
    args = parser.parse_args()
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch sees none); nothing to check on this machine")
        return
    if DEVICE.type == "cuda":
        header = (f"GPU: {torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}, "
                  f"CUDA {torch.version.cuda}")
    else:
        header = f"dry run on the CPU, torch {torch.__version__}"
    lines = [header, "", "| check | what | result | verdict |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        checks = [parity, bf16_steps, lambda: trainer_on_gpu(Path(tmp)), device_placement,
                  lambda: distributed(Path(tmp)), *([compiled] if args.compile else []),
                  lambda: versus_transformers(args.steps if DEVICE.type == "cuda" else 2)]
        PEAK[0] = bf16_peak()
        lines.insert(1, f"bf16 dense matmul peak measured here: {PEAK[0] / 1e12:.0f} TFLOP/s")
        for part in checks:
            started = time.perf_counter()
            try:
                lines += part()
            except Exception as error:  # a check that breaks is reported, and the others still run
                lines.append(f"| {getattr(part, '__name__', 'check')} | run | {type(error).__name__}: {error} | FAIL |")
            print(lines[-1], f"({time.perf_counter() - started:.0f} s)", flush=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if DEVICE.type == "cuda":
        args.out.write_text("# GPU check\n\n" + report)


if __name__ == "__main__":
    main()

"""GPU check: what a CUDA machine must show before lmforge's "same code on GPUs" is believed.

    make gpu-check                      # or: python benchmarks/gpu_check.py [--compile] [--steps 20]

1. parity: tiny BERT, GPT-2 and Llama give the same outputs on CUDA as on the CPU (fp32);
2. bf16 autocast + SDPA: a masked-LM and a causal-LM training step run, losses close to fp32;
3. training through the Trainer on CUDA (device auto, precision auto), a checkpoint written
   on the GPU and resumed on the CPU with the same next loss;
4. optional ``torch.compile`` of the encoder (--compile);
5. DDP (nccl) on every GPU present, through torchrun, equal to one process;
6. BERT-base masked-LM training tokens/s and MFU in bf16 (against the measured bf16 peak).

It prints one report and writes it to --out (docs/gpu-check.md). Without CUDA it says so
and exits 0: nothing here runs on a CPU-only machine.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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
            gpu = model.to("cuda")(ids.cuda(), mask.cuda()).cpu()
        error = float((cpu - gpu)[mask.bool()].abs().max())
        lines.append(f"| parity {name} | max abs diff CUDA vs CPU (fp32) | {error:.2e} | {'ok' if error < 1e-4 else 'FAIL'} |")
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
                objective = MaskedLMObjective(MaskedLM(preset("bert-mini", vocab_size=1000)), 3, [0, 1, 2, 3]).cuda()  # type: ignore[arg-type]
            else:
                objective = CausalLMObjective(Decoder(preset("llama-mini", vocab_size=1000))).cuda()  # type: ignore[arg-type]
            ids = torch.randint(5, 1000, (8, 128), generator=torch.Generator().manual_seed(1))
            batch, _ = objective.prepare({"input_ids": ids}, [torch.Generator().manual_seed(r) for r in range(8)])
            batch = {k: v.cuda() for k, v in batch.items()}
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                out = objective(batch)
            loss = sum(out.loss_sums.values())
            loss.backward()  # type: ignore[union-attr]
            losses[str(dtype)] = float(loss) / max(int((batch.get("labels", batch.get("targets")) != -100).sum()), 1)
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

    def trainer(device: str, run: Path, steps: int) -> Trainer:
        torch.manual_seed(0)
        objective = MaskedLMObjective(MaskedLM(preset("bert-tiny", vocab_size=tokenizer.vocab_size)),  # type: ignore[arg-type]
                                      tokenizer.token_id("[MASK]"), special)  # type: ignore[arg-type]
        loader = PackedLoader(shards, 64, 16, seed=1, cls_id=tokenizer.token_id("[CLS]"), sep_id=tokenizer.token_id("[SEP]"))
        config = TrainConfig(steps=steps, batch_size=16, lr=1e-3, log_every=1, device=device, precision="fp32")
        return Trainer(objective, loader, config, run, tokenizer=tokenizer, progress=False)

    gpu = trainer("auto", folder / "run", 6)
    batches = iter(gpu.loader)
    for _ in range(4):
        gpu.train_step(batches)
    gpu.save()
    gpu_next = gpu.train_step(batches)["loss"]
    cpu = trainer("cpu", folder / "run", 6)
    cpu.resume()
    cpu_next = cpu.train_step(iter(cpu.loader))["loss"]
    ok = gpu.device.type == "cuda" and abs(gpu_next - cpu_next) < 1e-3
    return [f"| Trainer on {gpu.device}, checkpoint resumed on CPU | next loss GPU / CPU | {gpu_next:.5f} / {cpu_next:.5f} "
            f"| {'ok' if ok else 'FAIL'} |"]


def compiled() -> list[str]:
    from lmforge.models import Encoder, preset

    torch.manual_seed(0)
    model = Encoder(preset("bert-mini", vocab_size=1000)).cuda().eval()  # type: ignore[arg-type]
    ids = torch.randint(5, 1000, (16, 128), device="cuda")
    with torch.no_grad():
        eager = model(ids)
        fast = torch.compile(model)
        out = fast(ids)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            fast(ids)
        torch.cuda.synchronize()
        compiled_s = (time.perf_counter() - start) / 20
        start = time.perf_counter()
        for _ in range(20):
            model(ids)
        torch.cuda.synchronize()
        eager_s = (time.perf_counter() - start) / 20
    error = float((eager - out).abs().max())
    return [f"| torch.compile encoder | max diff; speed-up | {error:.1e}; {eager_s / compiled_s:.2f}x | "
            f"{'ok' if error < 1e-3 else 'FAIL'} |"]


def ddp(folder: Path) -> list[str]:
    count = torch.cuda.device_count()
    script = folder / "ddp_worker.py"
    script.write_text(DDP_WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(count), str(script),
               str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        return [f"| DDP nccl x{count} | run | failed: {done.stderr[-300:]!r} | FAIL |"]
    result = json.loads((folder / "ddp.json").read_text())
    return [f"| DDP nccl x{count} == 1 process | max param diff after 3 steps | {result['diff']:.2e} | "
            f"{'ok' if result['diff'] < 1e-4 else 'FAIL'} |"]


DDP_WORKER = '''
import json, sys, torch
from pathlib import Path
from lmforge.models import MaskedLM, preset
from lmforge.objectives import MaskedLMObjective
from lmforge.train import TrainConfig, Trainer
from lmforge.train.dist import setup_distributed

class Loader:
    def __init__(self, rank, world, micro):
        self.rank, self.world, self.micro, self.batch = rank, world, micro, 0
    def state_dict(self): return {"seed": 0, "epoch": 0, "batch": self.batch}
    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.batch)
            rows = torch.randint(5, 1000, (self.micro * self.world, 64), generator=g)
            self.batch += 1
            yield {"input_ids": rows[self.rank * self.micro:(self.rank + 1) * self.micro]}

dist = setup_distributed("auto")
def run(d, world, rank):
    torch.manual_seed(0)
    objective = MaskedLMObjective(MaskedLM(preset("bert-tiny", vocab_size=1000, hidden_dropout=0.0,
                                                  attention_dropout=0.0)), 3, [0, 1, 2, 3])
    config = TrainConfig(steps=3, batch_size=16, micro_batch_size=16 // world, lr=1e-3, precision="fp32")
    trainer = Trainer(objective, Loader(rank, world, 16 // world), config, Path(sys.argv[1]) / f"r{world}",
                      distributed=d, progress=False)
    batches = iter(trainer.loader)
    for _ in range(3):
        trainer.train_step(batches)
    return {k: v.detach().cpu() for k, v in trainer.objective.state_dict().items()}
many = run(dist, dist.world_size, dist.rank)
if dist.is_main:
    from lmforge.train.dist import Distributed
    one = run(Distributed(device=dist.device), 1, 0)
    diff = max(float((many[k] - one[k]).abs().max()) for k in one)
    (Path(sys.argv[1]) / "ddp.json").write_text(json.dumps({"diff": diff}))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
'''


def bert_base_throughput(steps: int) -> list[str]:
    from lmforge.hardware import matmul_peak
    from lmforge.models import MaskedLM, preset
    from lmforge.objectives import MaskedLMObjective
    from lmforge.train.optim import build_optimizer

    torch.manual_seed(0)
    objective = MaskedLMObjective(MaskedLM(preset("bert-base", vocab_size=30522)), 103, [0, 100, 101, 102, 103]).cuda()  # type: ignore[arg-type]
    optimizer = build_optimizer(objective, 1e-4, 0.01, 0.9, 0.999, 1e-8)
    batch_size, length = 64, 512
    generators = [torch.Generator().manual_seed(r) for r in range(batch_size)]
    ids = torch.randint(1000, 30522, (batch_size, length))
    batch, counts = objective.prepare({"input_ids": ids}, generators)
    batch = {k: v.cuda() for k, v in batch.items()}

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = objective(batch)
        (out.loss_sums["mlm"] / counts["mlm"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    tokens_per_s = steps * batch_size * length / (time.perf_counter() - start)
    peak = matmul_peak(torch.bfloat16, "cuda", 1.0)
    mfu = tokens_per_s * objective.flops_per_token() / peak
    memory = torch.cuda.max_memory_allocated() / 2**30
    return [f"| BERT-base MLM train, bf16, batch 64 x 512 | tokens/s; MFU vs measured bf16 peak ({peak / 1e12:.0f} TFLOP/s); "
            f"peak memory | {tokens_per_s:,.0f}; {mfu:.1%}; {memory:.1f} GiB | measured |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gpu-check.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch sees none); nothing to check on this machine")
        return
    header = (f"GPU: {torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}")
    lines = [header, "", "| check | what | result | verdict |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for part in (parity, bf16_steps, lambda: trainer_on_gpu(Path(tmp)), lambda: ddp(Path(tmp)),
                     *( [compiled] if args.compile else []), lambda: bert_base_throughput(args.steps)):
            try:
                lines += part()
            except Exception as error:  # a check that breaks is reported, and the others still run
                lines.append(f"| {getattr(part, '__name__', 'check')} | run | {type(error).__name__}: {error} | FAIL |")
            print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.write_text("# GPU check\n\n" + report)


if __name__ == "__main__":
    main()

"""The training loop's exactness guarantees, on a tiny BERT and real Chinese text."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_model
from lmforge.data.loader import PackedLoader
from lmforge.data.shards import TokenShards
from lmforge.models import MaskedLM, preset
from lmforge.objectives import MaskedLMObjective, MaskingConfig
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig, Trainer
from lmforge.train.checkpoint import latest_checkpoint


def make_objective(tokenizer: Tokenizer, seed: int = 0) -> MaskedLMObjective:
    torch.manual_seed(seed)
    model = MaskedLM(preset("bert-tiny", vocab_size=tokenizer.vocab_size, hidden_dropout=0.0,  # type: ignore[arg-type]
                            attention_dropout=0.0, max_position_embeddings=64))
    special = [tokenizer.token_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")]
    return MaskedLMObjective(model, tokenizer.token_id("[MASK]"), special, MaskingConfig(whole_word=True))  # type: ignore[arg-type]


def make_loader(shards: TokenShards, tokenizer: Tokenizer, micro: int, rank: int = 0, world: int = 1) -> PackedLoader:
    return PackedLoader(shards, 64, micro, seed=1, rank=rank, world_size=world, cls_id=tokenizer.token_id("[CLS]"),
                        sep_id=tokenizer.token_id("[SEP]"))


def train(tokenizer: Tokenizer, shards: TokenShards, folder: Path, steps: int, batch: int, micro: int,
          resume: bool = False, total_steps: int | None = None, **extra: object) -> tuple[Trainer, list[dict]]:  # type: ignore[type-arg]
    config = TrainConfig(steps=total_steps or steps, batch_size=batch, micro_batch_size=micro, lr=1e-3,
                         warmup_steps=2, precision="fp32", log_every=1, save_every=0, **extra)  # type: ignore[arg-type]
    trainer = Trainer(make_objective(tokenizer), make_loader(shards, tokenizer, micro), config, folder,
                      tokenizer=tokenizer, progress=False)
    if resume:
        assert trainer.resume()
    history = []
    batches = iter(trainer.loader)
    target = steps
    while trainer.step < target:
        history.append(trainer.train_step(batches))
    return trainer, history


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.objective.state_dict().items()}


def test_accumulation_equals_one_big_batch(zh_tokenizer: Tokenizer, zh_shards: TokenShards, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    gradients: list[dict[str, torch.Tensor]] = []
    original_step = torch.optim.AdamW.step

    def record_then_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        gradients.append({str(i): p.grad.clone() for i, p in enumerate(self.param_groups[0]["params"])
                          if p.grad is not None})
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record_then_step)
    # eps 1e-6: Adam's first step is ~lr * sign(g); a larger eps keeps near-zero gradients from
    # turning float summation-order noise into full-size updates
    big, big_history = train(zh_tokenizer, zh_shards, tmp_path / "big", 1, 32, 32, total_steps=10, eps=1e-6)
    small, small_history = train(zh_tokenizer, zh_shards, tmp_path / "small", 1, 32, 8, total_steps=10, eps=1e-6)
    assert small.accumulation == 4 and big.accumulation == 1
    for key, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][key], grad, atol=1e-7, rtol=1e-5)
    for key, value in params(big).items():
        torch.testing.assert_close(params(small)[key], value, atol=1e-6, rtol=0)
    for a, b in zip(big_history, small_history, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and a["tokens"] == b["tokens"]


def test_resume_is_exact(zh_tokenizer: Tokenizer, zh_shards: TokenShards, tmp_path: Path) -> None:
    straight, straight_history = train(zh_tokenizer, zh_shards, tmp_path / "straight", 20, 8, 8)
    first, first_history = train(zh_tokenizer, zh_shards, tmp_path / "split", 10, 8, 8, total_steps=20)
    first.save()
    second, second_history = train(zh_tokenizer, zh_shards, tmp_path / "split", 20, 8, 8, resume=True)
    losses = [h["loss"] for h in first_history + second_history]
    assert losses == [h["loss"] for h in straight_history]  # identical, not just close
    for key, value in params(straight).items():
        assert torch.equal(params(second)[key], value), key


def test_loss_falls_and_run_folder_is_complete(zh_tokenizer: Tokenizer, zh_shards: TokenShards, tmp_path: Path) -> None:
    from lmforge.train.tracking import report

    config = TrainConfig(steps=60, batch_size=16, lr=2e-3, warmup_steps=5, eval_every=30, eval_batches=4, log_every=5,
                         precision="auto")
    loader = make_loader(zh_shards, zh_tokenizer, 16)
    evaluation = lambda: iter(PackedLoader(zh_shards, 64, 16, seed=99, shuffle=False,  # noqa: E731
                                           cls_id=zh_tokenizer.token_id("[CLS]"), sep_id=zh_tokenizer.token_id("[SEP]")))
    trainer = Trainer(make_objective(zh_tokenizer), loader, config, tmp_path / "run", evaluation, zh_tokenizer,
                      progress=False)
    final = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert train_losses[-1] < train_losses[0] - 1.0
    assert final["mlm_accuracy"] > 30 / zh_tokenizer.vocab_size  # 30x chance
    assert final["perplexity"] < zh_tokenizer.vocab_size / 5
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert 0 < records[-2].get("mfu", records[-1].get("mfu", 0)) < 1
    assert report(tmp_path / "run").exists()
    model = load_model(latest_checkpoint(tmp_path / "run"))  # type: ignore[arg-type]
    assert isinstance(model, MaskedLM)


def _kill_while_writing(folder: str, shards_folder: str, tokenizer_folder: str) -> None:
    import lmforge.train.checkpoint as checkpoint_module

    tokenizer = Tokenizer.load(tokenizer_folder)
    shards = TokenShards(shards_folder)
    config = TrainConfig(steps=4, batch_size=8, precision="fp32", log_every=1)
    trainer = Trainer(make_objective(tokenizer), make_loader(shards, tokenizer, 8), config, folder, tokenizer=tokenizer,
                      progress=False)
    assert trainer.resume()
    batches = iter(trainer.loader)
    trainer.train_step(batches)
    original = checkpoint_module.write_model_files

    def dying(*args, **kwargs):  # type: ignore[no-untyped-def]
        original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # killed halfway through writing the checkpoint

    checkpoint_module.write_model_files = dying
    trainer.save()


def test_killed_while_writing_keeps_previous_checkpoint(zh_tokenizer: Tokenizer, zh_shards: TokenShards,
                                                        tmp_path: Path) -> None:
    trainer, _ = train(zh_tokenizer, zh_shards, tmp_path / "run", 2, 8, 8, total_steps=4)
    trainer.save()
    zh_tokenizer.save(tmp_path)
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=_kill_while_writing, args=(str(tmp_path / "run"), str(zh_shards.folder), str(tmp_path)))
    process.start()
    process.join(120)
    assert process.exitcode == -signal.SIGKILL
    folder = latest_checkpoint(tmp_path / "run")
    assert folder is not None and folder.name == "step-0000002"
    assert load_model(folder).config.vocab_size == zh_tokenizer.vocab_size
    resumed, _ = train(zh_tokenizer, zh_shards, tmp_path / "run", 3, 8, 8, resume=True, total_steps=4)
    assert resumed.step == 3


def test_signal_saves_a_checkpoint(zh_tokenizer: Tokenizer, zh_shards: TokenShards, tmp_path: Path) -> None:
    config = TrainConfig(steps=1000, batch_size=8, precision="fp32", log_every=1)
    trainer = Trainer(make_objective(zh_tokenizer), make_loader(zh_shards, zh_tokenizer, 8), config, tmp_path / "run",
                      tokenizer=zh_tokenizer, progress=False)
    original = trainer.train_step

    def step_then_signal(batches):  # type: ignore[no-untyped-def]
        out = original(batches)
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer.train_step = step_then_signal  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt, match=r"interrupted at step 3; the checkpoint in .*run resumes it: run the "
                                                r"same command again with --resume"):  # saved, reported as unfinished
        trainer.fit()
    assert trainer.step == 3
    assert latest_checkpoint(tmp_path / "run").name == "step-0000003"  # type: ignore[union-attr]


def test_bad_train_config_lists_every_problem() -> None:
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        TrainConfig(steps=0, batch_size=32, micro_batch_size=5, lr=-1, warmup_steps=-1)
    message = str(caught.value)
    for fragment in ("steps=0", "micro_batch_size=5", "lr=-1", "warmup_steps=-1"):
        assert fragment in message


def test_early_stopping_keeps_best_and_last_k(zh_tokenizer: Tokenizer, zh_shards: TokenShards, tmp_path: Path) -> None:
    config = TrainConfig(steps=50, batch_size=8, precision="fp32", eval_every=1, save_every=1, keep_last=2,
                         early_stopping_patience=3, log_every=1)
    trainer = Trainer(make_objective(zh_tokenizer), make_loader(zh_shards, zh_tokenizer, 8), config, tmp_path / "run",
                      eval_batches=lambda: iter([]), tokenizer=zh_tokenizer, progress=False)
    losses = iter([5.0, 4.0, 4.5, 4.2, 4.1, 3.0])  # best at step 2, then three evaluations without improvement
    trainer.evaluate = lambda: {"loss": next(losses)}  # type: ignore[method-assign]
    trainer.fit()
    assert trainer.step == 5
    folders = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert folders == ["step-0000002", "step-0000004", "step-0000005"]  # best + last 2
    best = json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text())
    assert best["step"] == 2 and best["value"] == 4.0


def test_training_records_the_precision_it_chose(zh_tokenizer: Tokenizer, zh_shards: TokenShards, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge import hardware

    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: 0.05)  # as on an AVX2-only CPU
    config = TrainConfig(steps=2, batch_size=8, log_every=1)  # precision: auto, device: auto
    trainer = Trainer(make_objective(zh_tokenizer), make_loader(zh_shards, zh_tokenizer, 8), config, tmp_path / "run",
                      tokenizer=zh_tokenizer, progress=False)
    trainer.fit()
    setup = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert setup["split"] == "setup" and setup["precision"] == "fp32" and "0.05x" in setup["precision_reason"]
    assert trainer.autocast_dtype is None and setup["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_a_full_disk_names_the_folder_and_keeps_the_last_checkpoint(zh_tokenizer: Tokenizer, zh_shards: TokenShards,
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import lmforge.checkpoint as checkpoint_module
    from lmforge.errors import DiskFullError

    trainer, _ = train(zh_tokenizer, zh_shards, tmp_path / "run", 2, 8, 8, total_steps=4)
    trainer.save()

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_tensors", no_space)
    trainer.step = 3
    with pytest.raises(DiskFullError, match=r"no space left on the device of .*checkpoints while saving step 3: "
                                            r"a checkpoint needs about [\d,]+ MB"):
        trainer.save()
    assert latest_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "step-0000002"
    assert load_model(tmp_path / "run" / "checkpoints" / "step-0000002") is not None


def test_wandb_offline_and_mlflow_runs_write_their_files(zh_tokenizer: Tokenizer, zh_shards: TokenShards,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.config import load_run_config

    for name in ("WANDB_MODE", "MLFLOW_TRACKING_URI", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    config = load_run_config({"train": TrainConfig}, None, ["--train.trackers", "tensorboard,wandb,mlflow",
                                                           "--train.steps", "3", "--train.batch_size", "8",
                                                           "--train.log_every", "1"])["train"]
    assert config.trackers == ["tensorboard", "wandb", "mlflow"]
    Trainer(make_objective(zh_tokenizer), make_loader(zh_shards, zh_tokenizer, 8), config, tmp_path / "run",
            tokenizer=zh_tokenizer, progress=False).fit()
    run = tmp_path / "run"
    assert any((run / "tensorboard").iterdir())
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))  # offline: no network, synced later if wanted
    metric_files = list((run / "mlruns").glob("*/*/metrics/train/loss"))
    assert metric_files and len(metric_files[0].read_text().splitlines()) == 3  # one line per logged step
    with pytest.raises(Exception, match="unknown neptune"):
        TrainConfig(trackers=["neptune"])

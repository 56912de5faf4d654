"""Training: one loop (loop.py), optimizer and schedules, checkpoints, torchrun, tracking."""

from lmforge.train.loop import Trainer, TrainConfig

__all__ = ["TrainConfig", "Trainer"]

"""Training: one loop (loop.py), optimizer and schedules, checkpoints, torchrun, tracking."""

from lmforge.train.loop import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]

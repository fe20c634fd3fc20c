"""Training: the two-stage trainer, torchrun plumbing and the tau calibration of the clustering."""

from setok.train.trainer import Trainer, TrainOptions, train

__all__ = ["TrainOptions", "Trainer", "train"]

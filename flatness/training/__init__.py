"""The training loop behind ``flatness train``: run directories, checkpoints, exact resume."""

from flatness.training.config import TrainConfig
from flatness.training.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]

"""TensorBoard event files through ``torch.utils.tensorboard`` (the ``tensorboard`` package, imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flatness.errors import FlatnessError
from flatness.loggers import scalars


class TensorBoardLogger:
    """``log(metrics, step)`` as TensorBoard scalars in ``log_dir`` (one tag per metric name).

    Args:
        log_dir: the folder of the event files (created if missing).

    Raises:
        FlatnessError: the ``tensorboard`` package is not installed.

    Example:
        >>> import tempfile
        >>> logger = TensorBoardLogger(tempfile.mkdtemp())  # doctest: +SKIP
        >>> logger.log({"train_loss": 0.5, "curvature/lambda_max": 12.0}, step=10)  # doctest: +SKIP
        >>> logger.close()  # doctest: +SKIP
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FlatnessError("TensorBoard logging needs the tensorboard package: pip install 'flatness[tensorboard]'") from None
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for name, value in scalars(metrics).items():
            self._writer.add_scalar(name, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

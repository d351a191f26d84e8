"""Where metrics go besides the JSONL files: a tiny protocol and the loggers that implement it.

A logger is anything with ``log(metrics: dict, step: int)`` (and, optionally,
``close()``). ``flatness train --log KIND DIR`` picks one with
:func:`make_logger`: ``tensorboard`` (:class:`~flatness.loggers.tensorboard.TensorBoardLogger`),
or your own as ``module:callable`` / ``file.py:callable``, called with ``DIR``
and returning such an object::

    # mylog.py
    class PrintLogger:
        def __init__(self, target): self.target = target
        def log(self, metrics, step): ...

    flatness train --log mylog.py:PrintLogger runs/x/log ...

The training loop calls ``log`` with every epoch's metrics row (step =
updates so far) and with every curvature-tracking row under ``curvature/``
keys; the Lightning and Hugging Face curvature callbacks accept one too.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from flatness.errors import FlatnessError

__all__ = ["LOGGER_KINDS", "MetricLogger", "make_logger", "scalars"]

#: Built-in logger kinds of ``--log KIND DIR``.
LOGGER_KINDS = ("tensorboard",)


@runtime_checkable
class MetricLogger(Protocol):
    """``log(metrics, step)``: record scalar metrics at a step (an update count)."""

    def log(self, metrics: dict[str, Any], step: int) -> None: ...


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of ``metrics`` as floats (strings, None and bools are left out)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def make_logger(kind: str, target: str) -> MetricLogger:
    """The logger ``kind`` writing to ``target``: a built-in kind or a ``module:callable`` spec.

    Raises:
        FlatnessError: an unknown kind, a spec that cannot be loaded, or an
            object without ``log(metrics, step)``.
    """
    if kind == "tensorboard":
        from flatness.loggers.tensorboard import TensorBoardLogger

        return TensorBoardLogger(target)
    from flatness.hooks import is_callable_spec, load_callable

    if not is_callable_spec(kind):
        raise FlatnessError(f"unknown logger {kind!r}; expected one of {', '.join(LOGGER_KINDS)} or module:callable")
    logger = load_callable(kind)(target)
    if not callable(getattr(logger, "log", None)):
        raise FlatnessError(f"--log {kind}: {type(logger).__name__} has no log(metrics, step) method")
    return logger

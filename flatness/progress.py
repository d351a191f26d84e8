"""Progress on stderr: a tqdm bar in a terminal, plain log lines when stderr is piped.

In a terminal, :func:`progress` is a tqdm bar. When stderr is not a terminal
(CI, ``nohup``, a notebook, ``2> log``) a bar would print nothing useful, so
each stage logs one plain line every :data:`PLAIN_INTERVAL` seconds while it
runs and one when it finishes, with the elapsed time, through the
``flatness`` logger (the CLI sends that logger to stderr; library users see
nothing unless they configure logging). There is no "started" line: a stage
that fails early leaves only the CLI's one ``error:`` line, and a stage that
ends in an exception logs no "finished" line; one that is cut short (Ctrl-C
on a loop, a ``break``) logs ``stopped after 1/2 steps``, never "finished".
Under ``torchrun`` only rank 0 reports (every rank runs the same stages).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

LOG = logging.getLogger("flatness")
PLAIN_INTERVAL = 30.0  # seconds between two "still running" lines of one stage


class PlainProgress(tqdm):
    """A disabled tqdm that logs start, periodic and finish lines instead of drawing a bar."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, desc: str | None = None, **kwargs: Any) -> None:
        super().__init__(iterable, desc=desc, disable=True, **kwargs)
        self._label = desc or "working"
        self._unit = "steps" if kwargs.get("unit", "it") == "it" else kwargs["unit"]
        self._total = kwargs.get("total") or (len(iterable) if hasattr(iterable, "__len__") else None)
        self._count = 0
        self._start = self._last = time.monotonic()
        self._done = False
        self._complete = iterable is None  # an iterated stage is complete once its loop ran out

    def __iter__(self) -> Iterator[Any]:
        for obj in super().__iter__():
            yield obj
            self.update(1)
        self._complete = True
        self.close()

    def update(self, n: float | None = 1) -> bool | None:
        self._count += int(n or 0)
        now = time.monotonic()
        if now - self._last >= PLAIN_INTERVAL:
            self._last = now
            LOG.info("%s: running, %s after %s", self._label, self._position(), duration(now - self._start))
        return None

    def _position(self) -> str:
        return f"{self._count}/{self._total} {self._unit}" if self._total else f"{self._count} {self._unit}"

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if isinstance(exc, KeyboardInterrupt):
            self._finish(exc)
        elif exc_type is not None:
            self._done = True  # failed: the CLI's one ``error:`` line says why
        super().__exit__(exc_type, exc, tb)

    def close(self) -> None:
        self._finish(sys.exc_info()[1])  # called in a ``finally`` while an exception propagates: that one
        super().close()

    def __del__(self) -> None:
        self._done = True  # collected (an abandoned loop): no line from the garbage collector
        super().__del__()

    def _finish(self, exc: BaseException | None) -> None:
        """Log how the stage ended, once: finished, stopped (Ctrl-C, a ``break``), or nothing (failed part-way).

        ``exc``: the exception in flight when the stage is closed (``close`` in
        a ``finally``), else None (or one being handled around the stage).
        """
        if self._done:
            return
        self._done = True
        interrupted = isinstance(exc, KeyboardInterrupt)
        short = self._total is not None and self._count < self._total
        elapsed = duration(time.monotonic() - self._start)
        if self._complete and not short and not interrupted:
            LOG.info("%s: finished (%s) in %s", self._label, self._position(), elapsed)
        elif interrupted or exc is None:
            LOG.info("%s: stopped after %s in %s", self._label, self._position(), elapsed)
        # else: failed part-way; the CLI's one ``error:`` line says why


def duration(seconds: float) -> str:
    """Elapsed time with two significant digits below 10 s (``0.031 s``, ``2.5 s``), whole seconds above."""
    if seconds < 10:
        return f"{float(f'{seconds:.2g}'):g} s"
    return f"{seconds:.0f} s"


def is_reporting_rank() -> bool:
    """False on the ranks other than 0 of a ``torchrun`` job (they run the same stages as rank 0)."""
    return os.environ.get("RANK", "0") in ("", "0")


def progress(iterable: Iterable[T] | None = None, *, quiet: bool = False, **kwargs: Any) -> tqdm:
    """A progress reporter on stderr: a tqdm bar in a terminal, :class:`PlainProgress` lines otherwise, nothing when ``quiet``."""
    if quiet or not is_reporting_rank():
        return tqdm(iterable, file=sys.stderr, disable=True, **kwargs)
    if not sys.stderr.isatty():
        return PlainProgress(iterable, **kwargs)
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)

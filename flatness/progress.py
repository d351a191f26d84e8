"""Progress on stderr: a tqdm bar in a terminal, plain log lines when stderr is piped.

In a terminal, :func:`progress` is a tqdm bar. When stderr is not a terminal
(CI, ``nohup``, a notebook, ``2> log``) a bar would print nothing useful, so
each stage logs one plain line every :data:`PLAIN_INTERVAL` seconds while it
runs and one when it finishes, with the elapsed time, through the
``flatness`` logger (the CLI sends that logger to stderr; library users see
nothing unless they configure logging). There is no "started" line: a stage
that fails early leaves only the CLI's one ``error:`` line, and a stage that
ends in an exception logs no "finished" line.
"""

from __future__ import annotations

import logging
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

    def __iter__(self) -> Iterator[Any]:
        for obj in super().__iter__():
            yield obj
            self.update(1)
        self.close()

    def update(self, n: float | None = 1) -> bool | None:
        self._count += int(n or 0)
        now = time.monotonic()
        if now - self._last >= PLAIN_INTERVAL:
            self._last = now
            LOG.info("%s: running, %s after %.0f s", self._label, self._position(), now - self._start)
        return None

    def _position(self) -> str:
        return f"{self._count}/{self._total} {self._unit}" if self._total else f"{self._count} {self._unit}"

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._done = True  # failed: the CLI reports the error; no "finished" line
        super().__exit__(exc_type, exc, tb)

    def close(self) -> None:
        if not self._done:
            self._done = True
            LOG.info("%s: finished (%s) in %.1f s", self._label, self._position(), time.monotonic() - self._start)
        super().close()


def progress(iterable: Iterable[T] | None = None, *, quiet: bool = False, **kwargs: Any) -> tqdm:
    """A progress reporter on stderr: a tqdm bar in a terminal, :class:`PlainProgress` lines otherwise, nothing when ``quiet``."""
    if quiet:
        return tqdm(iterable, file=sys.stderr, disable=True, **kwargs)
    if not sys.stderr.isatty():
        return PlainProgress(iterable, **kwargs)
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)

"""Progress bars on stderr (tqdm), off when quiet or when stderr is not a TTY."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, quiet: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr; ``disable`` when ``quiet`` or stderr is not a TTY."""
    disable = quiet or not sys.stderr.isatty()
    return tqdm(iterable, file=sys.stderr, disable=disable, dynamic_ncols=True, leave=False, **kwargs)

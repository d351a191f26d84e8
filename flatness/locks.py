"""Exclusive locks on output folders (a run directory, a report folder).

``fcntl.flock`` on a ``.lock`` file inside the folder: a second process that
wants the same folder is refused at once (no waiting), and the lock goes away
with its process, even after SIGKILL, so a killed command never leaves a
folder locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from flatness.errors import FlatnessError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def folder_lock(folder: Path, *, busy: str, unwritable: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder/.lock`` while the ``with`` block runs.

    Args:
        folder: an existing folder.
        busy: the one-line error when another process holds the lock.
        unwritable: the one-line error when the lock file cannot be created;
            ``{reason}`` in it is replaced by the system's reason.

    Raises:
        FlatnessError: the folder is in use, or the lock file cannot be created.
    """
    lock = folder / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        raise FlatnessError(unwritable.replace("{reason}", str(e.strerror))) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FlatnessError(busy) from None
        yield lock
    finally:
        os.close(fd)

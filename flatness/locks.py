"""Exclusive locks on output folders (a run directory, a report folder).

``fcntl.flock`` on a ``.lock`` file inside the folder: a second process that
wants the same folder is refused at once (no waiting), and the lock goes away
with its process, even after SIGKILL, so a killed command never leaves a
folder locked. A command that ends (finished or failed) deletes the file.
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
    """Hold an exclusive lock on ``folder/.lock`` while the ``with`` block runs; the file is deleted when it ends.

    Deleting the lock file (so that a finished run or report holds no
    ``.lock``) makes it a moving target: a process that opened the file just
    before its holder deleted it would lock a file nobody else sees, beside a
    third process that created a new one. So after locking, the holder checks
    that the path still names the file it locked, and otherwise starts over on
    the current one. The file is deleted while still locked.

    Args:
        folder: an existing folder.
        busy: the one-line error when another process holds the lock.
        unwritable: the one-line error when the lock file cannot be created;
            ``{reason}`` in it is replaced by the system's reason.

    Raises:
        FlatnessError: the folder is in use, or the lock file cannot be created.
    """
    lock = folder / LOCK_NAME
    fd = _lock_fd(lock, busy=busy, unwritable=unwritable)
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):  # still locked: a process that opened it finds it gone and starts over
            lock.unlink()
        os.close(fd)


def _lock_fd(lock: Path, *, busy: str, unwritable: str, attempts: int = 100) -> int:
    """An fd holding the ``flock`` of the file that ``lock`` names now (see :func:`folder_lock`)."""
    for _ in range(attempts):
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as e:
            raise FlatnessError(unwritable.replace("{reason}", str(e.strerror))) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FlatnessError(busy) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # we locked a file its holder had just deleted: lock the current one
    raise FlatnessError(busy)

"""Kill a running ``flatness surface`` while it is mid-work, and prove it was.

No hook in the product: the test watches the output file itself (read with
HDF5 file locking off, as the writer holds the lock) and sends SIGKILL once
some but not all cells are computed.
"""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Kill:
    """What a kill attempt saw: the return code, the cells computed when it fired and after."""

    returncode: int | None
    seen: int
    after: int
    total: int

    @property
    def landed(self) -> bool:
        """Killed by SIGKILL while a partial output existed (some cells, not all)."""
        return self.returncode == -signal.SIGKILL and 0 < self.seen < self.total and self.after < self.total


def computed_cells(path: Path) -> int | None:
    """Number of computed (non-NaN) ``train_loss`` cells, or None when the file cannot be read now."""
    import h5py

    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(np.isfinite(np.asarray(f["train_loss"][()])).sum())
    except (OSError, KeyError, RuntimeError, ValueError):  # caught between two writes of the running process
        return None


def kill_when_partial(proc: subprocess.Popen, out: Path, total: int, *, at_least: int = 1, timeout: float = 120.0) -> Kill:
    """SIGKILL ``proc`` as soon as ``out`` holds at least ``at_least`` (but fewer than ``total``) computed cells."""
    seen = 0
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        n = computed_cells(out) if out.exists() else None
        if n is not None and at_least <= n < total:
            seen = n
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    after = computed_cells(out) if out.exists() else 0
    return Kill(proc.returncode, seen, after or 0, total)

"""Where generated datasets are cached: ``$FLATNESS_CACHE`` or ``~/.cache/flatness``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder (not created here)."""
    env = os.environ.get("FLATNESS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "flatness"

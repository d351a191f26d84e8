"""Device selection from the CLI's ``--device auto|cpu|cuda`` convention."""

from __future__ import annotations

import torch

from flatness.errors import FlatnessError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a ``torch.device``.

    Raises:
        FlatnessError: unknown name, or CUDA asked for but not available.
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise FlatnessError(f"--device {name!r} asked for, but CUDA is not available on this machine")
        return torch.device(name)
    raise FlatnessError(f"unknown device {name!r}; expected 'auto', 'cpu' or 'cuda'")

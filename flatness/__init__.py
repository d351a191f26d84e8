"""flatness: train with flatness-seeking optimizers and measure the flatness reached.

Public API (imported lazily, so ``import flatness`` stays fast)::

    from flatness import load_checkpoint, load_dataset, build_model, FlatnessError
"""

from __future__ import annotations

import importlib
from typing import Any

from flatness.errors import FlatnessError
from flatness.version import __version__

# name -> module that defines it; resolved on first attribute access (PEP 562).
_LAZY = {
    "load_checkpoint": "flatness.checkpoint",
    "save_checkpoint": "flatness.checkpoint",
    "Checkpoint": "flatness.checkpoint",
    "load_dataset": "flatness.data",
    "analysis_batches": "flatness.data",
    "build_model": "flatness.models",
    "resolve_device": "flatness.device",
    "train": "flatness.training",
    "TrainConfig": "flatness.training",
    "top_eigenvalues": "flatness.curvature",
    "hessian_trace": "flatness.curvature",
    "spectral_density": "flatness.curvature",
    "loss_surface": "flatness.landscape",
}

__all__ = ["FlatnessError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flatness' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

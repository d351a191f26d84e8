"""One-line errors for a missing optional package."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise ``ImportError`` naming ``pip install 'flatness[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed for this (it failed to import: {e}); pip install 'flatness[{extra}]'") from None

"""One-line errors for a missing optional package."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise ``ImportError`` naming ``pip install 'flatness[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise ImportError(f"{module} is needed for this ({detail}); pip install 'flatness[{extra}]'") from None

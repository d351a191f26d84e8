"""Hide a torchvision that is installed but cannot be imported (test processes only).

PyPI's torchvision wheel is built against CUDA torch; beside a CPU-only torch
``import torchvision`` fails ("operator torchvision::nms does not exist").
Lightning (through torchmetrics) and transformers' Trainer import torchvision
whenever its distribution is installed, so they fail too. When the import
fails, this makes torchvision look absent to Python's import system and to
the metadata checks these packages use (``importlib.util.find_spec`` and
``lightning_utilities.RequirementCache``), and they run without it.

tests/integrations/conftest.py calls :func:`hide_broken_torchvision` in the
test process; subprocesses get this folder first on ``PYTHONPATH``, where
Python's ``site`` imports this file at startup. A working torchvision is left
alone.
"""

from __future__ import annotations

import sys


def torchvision_error() -> str | None:
    """Why ``import torchvision`` fails here, or None when it works (or is not installed)."""
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        return None
    except (ImportError, RuntimeError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def hide_broken_torchvision() -> str | None:
    """Make a broken torchvision look absent; returns the import error (None: nothing hidden)."""
    error = torchvision_error()
    if error is None:
        return None
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision"] = None  # type: ignore[assignment]  # import -> ModuleNotFoundError, find_spec -> None
    try:
        import lightning_utilities.core.imports as lu
    except ImportError:
        return error
    from importlib.metadata import PackageNotFoundError

    version = lu._version

    def _version(name: str) -> str:
        if name == "torchvision":
            raise PackageNotFoundError(name)
        return version(name)

    lu._version = _version
    return error


if not getattr(sys, "_flatness_torchvision_checked", False):
    sys._flatness_torchvision_checked = True  # type: ignore[attr-defined]
    TORCHVISION_ERROR = hide_broken_torchvision()

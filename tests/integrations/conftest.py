"""Integration tests run with the real Lightning / transformers / tensorboard packages.

A torchvision that is installed but broken (PyPI's CUDA wheel beside a CPU
torch) is hidden first, in this process and in the CLI subprocesses
(``subprocess_env``); see torchvision_guard/sitecustomize.py.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

GUARD = Path(__file__).resolve().parent / "torchvision_guard"
_spec = importlib.util.spec_from_file_location("flatness_tests_torchvision_guard", GUARD / "sitecustomize.py")
_guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_guard)
TORCHVISION_ERROR: str | None = _guard.TORCHVISION_ERROR if hasattr(_guard, "TORCHVISION_ERROR") else None
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for ``run_cli``: one thread, offline hub, the torchvision guard when torchvision is broken."""
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if TORCHVISION_ERROR is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(GUARD), os.environ.get("PYTHONPATH", "")) if p)
    return env

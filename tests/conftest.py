"""Shared fixtures: an isolated dataset cache and tiny checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Subprocesses run from an empty directory, never the checkout: ``python -m flatness`` puts its
# working directory first on sys.path, and the tests must exercise the installed package.
RUN_DIR = Path(tempfile.mkdtemp(prefix="flatness-tests-cwd-"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """One intra-op thread in the test process and its subprocesses.

    CI has 2 cores; with several threads each tiny op pays a thread sync, and
    subprocess tests running beside the main process oversubscribe the cores.
    Bitwise comparisons always compare runs made with the same thread count.
    """
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep generated datasets out of the user's home (shared across the session)."""
    if "FLATNESS_CACHE" not in os.environ:
        os.environ["FLATNESS_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def make_checkpoint(tmp_path: Path):
    """``make_checkpoint(model="cnn1d", data="synthetic", seed=0, **model_kwargs) -> Path``."""
    from flatness.checkpoint import save_checkpoint
    from flatness.models import build_model

    def make(model: str = "cnn1d", data: str = "synthetic", seed: int = 0, name: str | None = None, **kwargs) -> Path:
        torch.manual_seed(seed)
        kw = {"in_features": 40, "num_classes": 10, **kwargs} if model in ("mlp", "cnn1d") else {"num_classes": 10, **kwargs}
        net = build_model(model, **kw)
        path = tmp_path / (name or f"{model}_{seed}.pt")
        save_checkpoint(
            path,
            {"model": model, "model_kwargs": kw, "dataset": data, "config": {"model": model, "data": data, "seed": seed},
             "state_dict": net.state_dict(), "metrics": [], "epoch": 0, "step": 0},
        )
        return path

    return make


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real, installed ``flatness`` command in a subprocess (``python -m flatness``)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flatness", *args], cwd=cwd or RUN_DIR, env=full_env, capture_output=True, text=True, timeout=timeout
    )

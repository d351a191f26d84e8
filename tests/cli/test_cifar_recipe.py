"""The CIFAR recipe in docs/cifar_recipe.md runs as written (tiny data, one epoch)."""

from __future__ import annotations

import os
import pickle
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, RUN_DIR

DOC = REPO / "docs" / "cifar_recipe.md"


def _recipe() -> list[list[str]]:
    text = DOC.read_text()
    block = text.split("<!-- recipe:begin -->")[1].split("<!-- recipe:end -->")[0]
    return [shlex.split(line) for line in block.splitlines() if line.startswith(("flatness", "torchrun"))]


def _tiny_cifar100(root: Path) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", 16), ("test", 8)):
        data = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": rng.integers(0, 100, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(data))


def _adapt(cmd: list[str], data: Path, out: Path) -> list[str]:
    args = list(cmd)
    for flag, value in (("--data-dir", str(data)), ("--epochs", "1"), ("--batch-size", "8"), ("--out", str(out)), ("--device", "cpu")):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    args += ["--model-kwargs", '{"width": 8}', "--quiet"]
    return args


@pytest.mark.parametrize("index", range(4))
def test_recipe_line_runs(tmp_path: Path, index: int) -> None:
    cmd = _recipe()[index]
    _tiny_cifar100(tmp_path / "data")
    out = tmp_path / "run"
    args = _adapt(cmd, tmp_path / "data", out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if args[0] == "torchrun":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        i = args.index("train")
        nproc = args[args.index("--nproc_per_node") + 1]
        full = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", nproc, "--master_port", str(port), "-m", "flatness", *args[i:]]
    else:
        full = [sys.executable, "-m", "flatness", *args[1:]]
    r = subprocess.run(full, cwd=RUN_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "final.pt").exists()
    config = __import__("json").loads((out / "config.json").read_text())
    assert config["data"] == "cifar100" and config["model"] == "resnet18" and config["weight_decay"] == 1e-3
    assert config["cutout"] == 16 and config["lr"] == 0.1


def test_recipe_has_the_papers_hyperparameters() -> None:
    lines = _recipe()
    marwp = next(c for c in lines if "m-arwp" in c)
    get = lambda flag: marwp[marwp.index(flag) + 1]  # noqa: E731
    assert (get("--sigma"), get("--lam"), get("--eta"), get("--beta")) == ("0.015", "0.5", "0.1", "0.99")
    assert (get("--epochs"), get("--batch-size"), get("--weight-decay")) == ("200", "256", "1e-3")
    assert any("--parallel-roles" in c for c in lines)
    assert re.search(r"torchrun --nproc_per_node 2", DOC.read_text())

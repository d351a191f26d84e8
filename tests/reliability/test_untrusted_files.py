"""Checkpoints (and CIFAR batches) carrying a pickle payload are refused before any of it runs.

The payload is an object whose ``__reduce__`` calls ``os.system("touch MARKER")``
when unpickled. It is hidden in a real checkpoint in several ways (an extra
field, the legacy non-zip format, the whole file, a state_dict value) and
fed to every command that reads checkpoints: ``train --resume`` (as the run's
``checkpoints/last.pt``), ``hessian``, ``surface`` (as the centre, as the
``--to`` end of an interpolation, as a run directory's ``final.pt``) and
``compare``. Each must exit 2 with one ``error:`` line saying the file was
refused; the marker must never appear and no file may be written or changed.
A control test shows the payload does run under a plain ``torch.load``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import RUN_DIR, run_cli


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(path: Path, good: Path, marker: Path, how: str) -> None:
    obj = torch.load(good, weights_only=True)
    if how == "field":
        torch.save({**obj, "notes": Payload(marker)}, path)
    elif how == "legacy":
        torch.save({**obj, "notes": Payload(marker)}, path, _use_new_zipfile_serialization=False)
    elif how == "whole":
        torch.save(Payload(marker), path)
    elif how == "state-dict":
        state = dict(obj["state_dict"])
        state[next(iter(state))] = Payload(marker)
        torch.save({**obj, "state_dict": state}, path)
    else:
        raise ValueError(f"Unknown payload placement {how!r}")


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flatness.training import TrainConfig, train

    root = tmp_path_factory.mktemp("good") / "run"
    train(TrainConfig(model="mlp", data="synthetic", epochs=2, batch_size=64), root, device="cpu")
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))}


# (target, payload placement): every target with a payload in an extra field, the other placements on two of them.
CASES = [
    ("train-resume", "field"),
    ("hessian", "field"),
    ("surface", "field"),
    ("surface-interp-to", "field"),
    ("surface-run-dir", "field"),
    ("compare", "field"),
    ("hessian", "legacy"),
    ("hessian", "whole"),
    ("hessian", "state-dict"),
    ("train-resume", "legacy"),
    ("train-resume", "state-dict"),
]


@pytest.mark.parametrize(("target", "how"), CASES, ids=[f"{t}-{h}" for t, h in CASES])
def test_payload_refused(tmp_path: Path, good_run: Path, target: str, how: str) -> None:
    work = tmp_path / "work"
    marker = tmp_path / "markers" / "PAYLOAD_RAN"
    marker.parent.mkdir()
    good = work / "good.pt"
    work.mkdir()
    shutil.copy(good_run / "final.pt", good)
    evil = work / "evil.pt"
    _evil_checkpoint(evil, good, marker, how)
    device = ["--device", "cpu", "--quiet"]
    if target == "train-resume":
        run = work / "run"
        shutil.copytree(good_run, run)
        (run / "final.pt").unlink()
        shutil.copy(evil, run / "checkpoints" / "last.pt")
        argv = ["train", "--out", "run", "--resume", "--epochs", "3", *device]
    elif target == "hessian":
        argv = ["hessian", "evil.pt", "--out", "h.json", "--top-k", "1", *device]
    elif target == "surface":
        argv = ["surface", "evil.pt", "--x", "-1:1:3", "--out", "s.h5", *device]
    elif target == "surface-interp-to":
        argv = ["surface", "good.pt", "--directions", "interp", "--to", "evil.pt", "--x", "0:1:3", "--out", "s.h5", *device]
    elif target == "surface-run-dir":
        run = work / "run"
        run.mkdir()
        shutil.copy(evil, run / "final.pt")
        argv = ["surface", "run", "--x", "-1:1:3", "--out", "s.h5", *device]
    elif target == "compare":
        argv = ["compare", "good.pt", "evil.pt", "--out", "report", "--samples", "100", "--surface", "none", *device]
    else:
        raise ValueError(target)

    before = _snapshot(work)
    r = run_cli(*argv, cwd=work, timeout=300)
    lines = r.stderr.splitlines()
    assert not marker.exists(), "the pickle payload ran"
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "was refused: it holds objects other than tensors and plain values" in lines[0], lines[0]
    assert _snapshot(work) == before, "files were written or changed"


def test_cifar_batch_payload_refused(tmp_path: Path) -> None:
    """The CIFAR python-pickle batches go through a restricted unpickler."""
    marker = tmp_path / "PAYLOAD_RAN"
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": Payload(marker), b"labels": [0]}, f)
    before = _snapshot(tmp_path)
    r = run_cli("train", "--data", "cifar10", "--data-dir", "data", "--model", "resnet18", "--out", "run", "--device", "cpu", "--quiet",
                cwd=tmp_path)
    assert not marker.exists(), "the pickle payload ran"
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read CIFAR batch") and "refusing to load" in lines[0], r.stderr
    assert _snapshot(tmp_path) == before


def test_payload_is_live(tmp_path: Path, good_run: Path) -> None:
    """Control: the same file does run its payload under ``torch.load(weights_only=False)``."""
    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "evil.pt"
    _evil_checkpoint(evil, good_run / "final.pt", marker, "field")
    code = f"import torch; torch.load({str(evil)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], cwd=RUN_DIR, check=True, capture_output=True)
    assert marker.exists()

"""Writes that fail (disk full, file too large): the previous checkpoint or output survives.

Tests run as root, where a read-only folder does not stop writes, so the
failures are made two other ways that do:

- ``RLIMIT_FSIZE`` on the subprocess: the kernel refuses to grow any file
  past the limit (``EFBIG``), exactly as a full quota would, mid-write;
- in-process, ``torch.save`` writes into a file object that runs out of
  room part-way (``ENOSPC``), so torch's zip writer fails from the inside.

The run must stop with one ``error:`` line (exit 2), the checkpoint that was
there before must be byte-for-byte intact and loadable, no temp file may be
left, and resuming once there is room again must give exactly the weights
and metrics of a run that never failed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flatness.checkpoint import read_checkpoint_file

TRAIN = ["train", "--data", "synthetic", "--model", "mlp", "--batch-size", "32", "--schedule", "constant", "--device", "cpu", "--quiet"]


def _run_limited(*args: str, cwd: Path, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """``python -m flatness ARGS`` with every file it writes capped at ``max_file_bytes`` (RLIMIT_FSIZE)."""

    def limit() -> None:
        if max_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = {**os.environ}
    return subprocess.run([sys.executable, "-m", "flatness", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same(a, b) -> bool:  # noqa: ANN001 - nested checkpoint values
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (run / "metrics.jsonl").read_text().splitlines()]


def _temp_files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*.tmp")]


def test_checkpoint_too_large_keeps_previous(tmp_path: Path) -> None:
    """The kernel refuses the epoch-2 checkpoint mid-write; epoch 1's survives and the run resumes exactly."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = _run_limited(*TRAIN, "--epochs", "3", "--out", str(ref), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _run_limited(*TRAIN, "--epochs", "1", "--out", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    last = run / "checkpoints" / "last.pt"
    before = {p: _sha(p) for p in (last, run / "checkpoints" / "epoch_0001.pt", run / "metrics.jsonl")}
    assert last.stat().st_size > 64 * 1024
    (run / "final.pt").unlink()  # as if epoch 1 of 3 had just ended

    # a 1-epoch run resumed for 3: the plan changes (constant LR, so the result equals a run planned for 3)
    r = _run_limited(*TRAIN, "--epochs", "3", "--out", str(run), "--resume", "--replan-schedule", cwd=tmp_path, max_file_bytes=64 * 1024)
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: cannot write checkpoint ") and "File too large" in lines[0], lines[0]
    assert "the previous checkpoint is kept" in lines[0]
    assert {p: _sha(p) for p in before} == before, "the previous checkpoint or metrics changed"
    assert read_checkpoint_file(last)["epoch"] == 1
    assert not _temp_files(run)
    assert not (run / "final.pt").exists() and not (run / "checkpoints" / "epoch_0002.pt").exists()

    r = _run_limited(*TRAIN, "--epochs", "3", "--out", str(run), "--resume", "--replan-schedule", cwd=tmp_path)  # room again
    assert r.returncode == 0, r.stderr
    a, b = read_checkpoint_file(ref / "final.pt"), read_checkpoint_file(run / "final.pt")
    assert _same(a["state_dict"], b["state_dict"]) and _same(a["optimizer"], b["optimizer"])
    assert _metrics(ref) == _metrics(run)


class _FillingFile:
    """A file object with ``room`` bytes left: the write that crosses it writes what fits, then fails with ENOSPC."""

    def __init__(self, f, room: int) -> None:  # noqa: ANN001 - binary file
        self.f, self.room = f, room

    def write(self, data) -> int:  # noqa: ANN001 - bytes-like
        data = bytes(data)
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.f.write(data)
        self.room -= len(data)
        return len(data)

    def flush(self) -> None:
        self.f.flush()


@pytest.mark.parametrize("fail_at", [2, 5])
def test_disk_full_mid_run_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
    """The disk fills during the ``fail_at``-th checkpoint write (mid-epoch or at an epoch's end)."""
    from flatness.errors import FlatnessError
    from flatness.training import TrainConfig, train

    def config() -> TrainConfig:
        return TrainConfig(model="mlp", data="synthetic", epochs=2, batch_size=32, save_every=3)

    train(config(), tmp_path / "ref", device="cpu")
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.pt"
    real_save = torch.save
    seen: dict = {"calls": 0}

    def save(obj, f, *args, **kwargs):  # noqa: ANN001, ANN202 - torch.save's signature
        seen["calls"] += 1
        if seen["calls"] != fail_at:
            return real_save(obj, f, *args, **kwargs)
        seen["before"] = _sha(last) if last.exists() else None
        return real_save(obj, _FillingFile(f, room=4096), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(FlatnessError, match=r"cannot write checkpoint .*No space left on device; the previous checkpoint is kept") as e:
        train(config(), run, device="cpu")
    monkeypatch.undo()
    assert "\n" not in str(e.value)
    assert seen["before"] is not None and _sha(last) == seen["before"], "the previous checkpoint changed"
    read_checkpoint_file(last)
    assert not _temp_files(run)
    assert not (run / "final.pt").exists()

    train(config(), run, device="cpu", resume=True)
    a, b = read_checkpoint_file(tmp_path / "ref" / "final.pt"), read_checkpoint_file(run / "final.pt")
    assert _same(a["state_dict"], b["state_dict"]) and _same(a["optimizer"], b["optimizer"])
    assert _metrics(tmp_path / "ref") == _metrics(run)


def test_hessian_output_write_fails_keeps_old_file(tmp_path: Path, make_checkpoint) -> None:
    """``--force`` over an existing result whose replacement cannot be written: the old result stays."""
    ckpt = make_checkpoint("mlp")
    out = tmp_path / "h.json"
    out.write_text('{"top_eigenvalues": [1.0]}\n')
    old = _sha(out)
    r = _run_limited("hessian", str(ckpt), "--top-k", "1", "--out", str(out), "--force", "--device", "cpu", "--quiet",
                     cwd=tmp_path, max_file_bytes=64)
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: cannot write ") and "File too large" in lines[0], r.stderr
    assert _sha(out) == old
    assert not _temp_files(tmp_path)


def test_surface_write_fails_cleanly(tmp_path: Path, make_checkpoint) -> None:
    ckpt = make_checkpoint("mlp")
    r = _run_limited("surface", str(ckpt), "--x", "-1:1:21", "--out", "s.h5", "--device", "cpu", "--quiet", cwd=tmp_path,
                     max_file_bytes=8 * 1024)
    lines = r.stderr.splitlines()
    assert r.returncode == 2, f"exit status {r.returncode}"
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "s.h5").exists()
    assert not _temp_files(tmp_path)

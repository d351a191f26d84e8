"""flatness/training/rundir.py and flatness/locks.py: the run lock is exclusive, leaves no file behind, and a failed new run leaves no folder (issue 23)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from flatness import locks
from flatness.errors import FlatnessError
from flatness.training import rundir
from flatness.training.rundir import LOCK_NAME, open_run_dir


def test_a_finished_run_holds_no_lock_file(tmp_path: Path) -> None:
    with open_run_dir(tmp_path / "run", resume=False, force=False) as (run, resuming):
        assert (run.root / LOCK_NAME).exists() and not resuming
        run.last.write_bytes(b"a checkpoint")
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_a_second_holder_is_refused_while_the_first_holds_it(tmp_path: Path) -> None:
    with open_run_dir(tmp_path / "run", resume=False, force=False) as (run, _):
        run.config.write_text("{}\n")
        run.last.write_bytes(b"a checkpoint")
        with pytest.raises(FlatnessError, match="in use by another flatness train"):  # flock: one per open file, even in one process
            with open_run_dir(tmp_path / "run", resume=True, force=False):
                pass
        assert (run.root / LOCK_NAME).exists()  # the refused one did not take the holder's lock file away
    with open_run_dir(tmp_path / "run", resume=True, force=False) as (_, resuming):  # free again
        assert resuming


def test_a_lock_file_deleted_by_its_holder_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race that deleting the lock opens: we opened the old file just before its holder deleted it and another
    process made a new one. Locking the old file would let two processes in; the lock is taken on the current file."""
    root = tmp_path / "run"
    root.mkdir()
    run = rundir.RunDir(root)
    real_flock = fcntl.flock
    calls = {"n": 0}

    def flock_after_the_holder_left(fd: int, op: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:  # between our open and our lock: the holder deletes it, a newcomer recreates it
            os.unlink(run.lock)
            run.lock.write_bytes(b"")
        real_flock(fd, op)

    monkeypatch.setattr(locks.fcntl, "flock", flock_after_the_holder_left)
    fd = locks._lock_fd(run.lock, busy="busy", unwritable="{reason}")
    try:
        assert calls["n"] == 2
        assert os.path.samestat(os.fstat(fd), os.stat(run.lock))
        other = os.open(run.lock, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                real_flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    finally:
        os.close(fd)


def test_a_new_run_that_fails_before_its_first_checkpoint_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "new"
    with pytest.raises(RuntimeError, match="diverged"):
        with open_run_dir(out, resume=False, force=False) as (run, _):
            run.config.write_text("{}\n")
            run.metrics.write_text("")
            raise RuntimeError("diverged at step 1")
    assert not (tmp_path / "runs").exists()


def test_a_run_with_a_checkpoint_is_kept_when_it_fails(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with open_run_dir(out, resume=False, force=False) as (run, _):
            run.config.write_text("{}\n")
            run.last.write_bytes(b"a checkpoint")
            raise RuntimeError("diverged at epoch 3")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json"]


def test_a_failed_new_run_in_an_existing_empty_folder_leaves_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with open_run_dir(out, resume=False, force=False) as (run, _):
            run.config.write_text("{}\n")
            raise KeyboardInterrupt
    assert out.is_dir() and not any(out.iterdir())

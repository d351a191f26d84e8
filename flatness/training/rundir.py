"""The run directory layout (DESIGN.md section 6) and its safe creation."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatness.atomic import atomic_write_text
from flatness.errors import FlatnessError
from flatness.locks import LOCK_NAME, folder_lock

# Settings that may change between a run and its resume: bookkeeping that does not change the
# numbers, and ``epochs`` (only with ``replan_schedule``, checked by the trainer).
RESUMABLE_CHANGES = ("epochs", "updates", "data_epochs", "save_every", "keep_epochs")


@dataclass(frozen=True)
class RunDir:
    """Paths of a run directory: ``config.json``, ``metrics.jsonl``, ``checkpoints/``, ``final.pt``."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def curvature(self) -> Path:
        return self.root / "curvature.jsonl"

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME

    @property
    def final(self) -> Path:
        return self.root / "final.pt"

    def epoch(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:04d}.pt"

    def epoch_checkpoints(self) -> list[Path]:
        return sorted(self.checkpoints.glob("epoch_*.pt"))

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.config, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def read_config(self) -> dict[str, Any]:
        try:
            config = json.loads(self.config.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FlatnessError(f"cannot read {self.config}: {e}") from None
        if not isinstance(config, dict):
            raise FlatnessError(f"{self.config} does not hold a JSON object of settings")
        return config

    def write_metrics(self, metrics: list[dict[str, Any]]) -> None:
        self.write_jsonl(self.metrics, metrics)

    @staticmethod
    def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
        """One JSON object per line, rewritten whole (atomically) from the checkpoint's list."""
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _leftovers_only(root: Path) -> bool:
    """True when ``root`` holds only what a run killed before writing config.json leaves."""
    for entry in root.iterdir():
        if entry.name == "checkpoints" and entry.is_dir() and not any(entry.iterdir()):
            continue
        if entry.name == LOCK_NAME or (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        return False
    return True


def remove_temp_files(run: RunDir) -> None:
    """Delete temp files of atomic writes interrupted by a kill (never a finished file)."""
    for folder in (run.root, run.checkpoints):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def open_run_dir(out: str | Path, *, resume: bool, force: bool) -> Iterator[tuple[RunDir, bool]]:
    """Create or reuse a run directory and hold its lock while the ``with`` block runs.

    Everything is checked before the first change: the target, the lock
    (``fcntl.flock`` on ``.lock`` in the run directory: a second ``train``
    on the same run is refused), and that the folders can be written; only
    then does ``force`` remove the old run. The lock file is removed when the
    block ends. A new run that fails before its first checkpoint (divergence
    at step 1, an error in the user's loss, Ctrl-C) is removed with it: a run
    directory always holds a checkpoint, or does not exist.

    Yields:
        The run dir and whether an existing run is being resumed (it has a
        ``checkpoints/last.pt``).

    Raises:
        FlatnessError: see :func:`prepare_run_dir`; the run is in use; the
            folder cannot be written.
    """
    run = RunDir(Path(out))
    _check_target(run, resume=resume, force=force)
    created = [p for p in reversed([run.root, *run.root.parents]) if not p.exists()]
    if created:
        try:
            run.root.mkdir(parents=True)
        except OSError as e:
            raise FlatnessError(f"cannot create run directory {run.root}: {e.strerror}") from None
    try:
        with _locked(run):
            prepared = prepare_run_dir(run.root, resume=resume, force=force)
            try:
                yield prepared
            except BaseException:
                if not prepared[1]:
                    _remove_unfinished(run)
                raise
    finally:
        for folder in reversed(created):  # empty: nothing was written, or an unfinished run was removed
            with contextlib.suppress(OSError):
                folder.rmdir()


def _remove_unfinished(run: RunDir) -> None:
    """Delete what a new run wrote before its first checkpoint (config, metrics, empty checkpoints/)."""
    if run.last.exists() or run.final.exists() or run.epoch_checkpoints():
        return  # there is something to resume from: keep it
    for path in (run.config, run.metrics, run.curvature):
        path.unlink(missing_ok=True)
    remove_temp_files(run)
    with contextlib.suppress(OSError):
        run.checkpoints.rmdir()


def _check_target(run: RunDir, *, resume: bool, force: bool) -> None:
    """The refusals that need no lock, made before anything (even the lock file) is created."""
    if run.root.exists() and not run.root.is_dir():
        raise FlatnessError(f"--out {run.root} exists and is not a folder")
    if resume and (not run.root.exists() or not any(run.root.iterdir())):
        raise FlatnessError(
            f"--resume: there is no run in {run.root} to continue; to start a new run there, pass --out {run.root} without --resume"
        )
    if run.root.exists():
        _check_existing(run, resume=resume, force=force)


def _check_existing(run: RunDir, *, resume: bool, force: bool) -> bool:
    """Refuse to touch an existing folder without the flag that allows it; True when it is not empty."""
    nonempty = any(e.name != LOCK_NAME for e in run.root.iterdir())
    is_run = run.config.exists() or _leftovers_only(run.root)
    if nonempty and resume and not is_run:
        raise FlatnessError(f"--resume: {run.root} is not a flatness run directory (no config.json)")
    if nonempty and not resume and not force:
        raise FlatnessError(f"run directory {run.root} already exists; pass --resume to continue it or --force to replace it")
    if nonempty and force and not resume and not is_run:
        raise FlatnessError(f"--force: {run.root} is not a flatness run directory (no config.json); refusing to delete it")
    return nonempty


@contextlib.contextmanager
def _locked(run: RunDir) -> Iterator[None]:
    """Exclusive ``flock`` on the run's lock file (released when the process ends, even by SIGKILL; the file goes with the block)."""
    with folder_lock(
        run.root,
        busy=f"run directory {run.root} is in use by another flatness train (lock {run.lock}); wait for it to finish",
        unwritable=f"cannot write to run directory {run.root}: {{reason}}; make it writable or train into another --out",
    ):
        yield


def check_writable(run: RunDir) -> None:
    """Create and remove a probe file in the run folder and its checkpoints folder."""
    for folder in (run.root, run.checkpoints):
        if not folder.is_dir():
            continue
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise FlatnessError(f"cannot write to {folder}: {e.strerror}; make it writable or train into another --out") from None


def prepare_run_dir(out: str | Path, *, resume: bool, force: bool) -> tuple[RunDir, bool]:
    """Check an existing (or just created, empty) run directory and get it ready.

    Returns:
        The run dir and whether an existing run is being resumed (it has a
        ``checkpoints/last.pt``).

    Raises:
        FlatnessError: the folder exists and is not empty, without ``resume``
            or ``force``; ``resume`` or ``force`` on a folder that is not a run
            directory (we never delete what we did not write); a folder that
            cannot be written (checked before anything is removed).
    """
    run = RunDir(Path(out))
    nonempty = _check_existing(run, resume=resume, force=force)  # again, now under the lock
    check_writable(run)
    if nonempty and resume:
        remove_temp_files(run)
        if run.last.exists():
            return run, True
    elif nonempty:
        for path in (run.config, run.metrics, run.curvature, run.final):
            path.unlink(missing_ok=True)
        if run.checkpoints.exists():
            shutil.rmtree(run.checkpoints)
        remove_temp_files(run)
    try:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlatnessError(f"cannot create run directory {run.root}: {e.strerror}") from None
    return run, False


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], root: Path, *, what: str | None = None) -> None:
    """Refuse to resume a run with settings that change its numbers.

    ``what`` names the source of ``saved`` in the message (default: the run in ``root``).
    A setting that ``saved`` lacks (a run of an older version, before the
    setting existed) counts as its default; the derived protocol counts are
    functions of the settings and are not compared.
    """
    from flatness.training.config import RECORD_KEYS, TrainConfig

    defaults = TrainConfig().to_dict()
    diffs = [
        f"{k}: {saved.get(k, defaults.get(k))!r} -> {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if k not in RESUMABLE_CHANGES and k not in RECORD_KEYS and saved.get(k, defaults.get(k)) != current.get(k)
    ]
    if diffs:
        raise FlatnessError(f"--resume: settings differ from {what or f'the run in {root}'} ({'; '.join(diffs[:4])})")


def check_epochs_change(saved: dict[str, Any], epochs: int, root: Path, *, replan_schedule: bool) -> dict[str, int] | None:
    """A resume with another ``--epochs`` than the run was planned for needs ``replan_schedule``.

    The LR schedule (and the sigma schedule) run over the planned updates: a
    cosine run resumed with more epochs would train the extra ones at the
    schedule's end value (LR 0). With ``replan_schedule`` the schedules are
    planned over the new length from the current update on (docs/training.md).

    Returns:
        ``{"epochs_from": old, "epochs_to": new}`` when the plan changes, else None.

    Raises:
        FlatnessError: another length without ``replan_schedule``.
    """
    planned = saved.get("epochs")
    if not isinstance(planned, int) or planned == epochs:
        return None
    if not replan_schedule:
        raise FlatnessError(
            f"--resume: the run in {root} was planned for --epochs {planned} and its LR schedule runs over those updates; "
            f"--epochs {epochs} changes the plan: pass --replan-schedule to replan the schedules over {epochs} epochs "
            f"from the current update (see docs/training.md), or start a new run"
        )
    return {"epochs_from": planned, "epochs_to": epochs}


def resume_settings(out: str | Path, typed: dict[str, Any]) -> dict[str, Any] | None:
    """The settings of the run in ``out`` with the flags typed now on top (None: no run there).

    The typed flags must agree with the run's; :func:`check_resume_config`
    (in the trainer) refuses the ones that change its numbers.
    """
    run = RunDir(Path(out))
    if not run.config.exists():
        return None
    return {**run.read_config(), **typed}

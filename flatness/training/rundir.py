"""The run directory layout (DESIGN.md section 6) and its safe creation."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatness.atomic import atomic_write_text
from flatness.errors import FlatnessError

# Settings that may change between a run and its resume (they do not change the numbers).
RESUMABLE_CHANGES = ("epochs", "save_every", "keep_epochs")


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
        atomic_write_text(self.metrics, "".join(json.dumps(m, sort_keys=True) + "\n" for m in metrics))


def _leftovers_only(root: Path) -> bool:
    """True when ``root`` holds only what a run killed before writing config.json leaves."""
    for entry in root.iterdir():
        if entry.name == "checkpoints" and entry.is_dir() and not any(entry.iterdir()):
            continue
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            continue
        return False
    return True


def remove_temp_files(run: RunDir) -> None:
    """Delete temp files of atomic writes interrupted by a kill (never a finished file)."""
    for folder in (run.root, run.checkpoints):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def prepare_run_dir(out: str | Path, *, resume: bool, force: bool) -> tuple[RunDir, bool]:
    """Create or reuse a run directory.

    Returns:
        The run dir and whether an existing run is being resumed (it has a
        ``checkpoints/last.pt``).

    Raises:
        FlatnessError: the folder exists and is not empty, without ``resume``
            or ``force``; or ``force`` on a folder that is not a run directory
            (we never delete what we did not write).
    """
    run = RunDir(Path(out))
    if run.root.exists() and not run.root.is_dir():
        raise FlatnessError(f"--out {run.root} exists and is not a folder")
    nonempty = run.root.exists() and any(run.root.iterdir())
    if nonempty and resume:
        if not run.config.exists():
            if not _leftovers_only(run.root):
                raise FlatnessError(f"--resume: {run.root} is not a flatness run directory (no config.json)")
        remove_temp_files(run)
        if run.last.exists():
            return run, True
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        return run, False
    if nonempty and not force:
        raise FlatnessError(f"run directory {run.root} already exists; pass --resume to continue it or --force to replace it")
    if nonempty and force:
        if not run.config.exists() and not _leftovers_only(run.root):
            raise FlatnessError(f"--force: {run.root} is not a flatness run directory (no config.json); refusing to delete it")
        for path in (run.config, run.metrics, run.final):
            path.unlink(missing_ok=True)
        shutil.rmtree(run.checkpoints, ignore_errors=True)
        remove_temp_files(run)
    try:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlatnessError(f"cannot create run directory {run.root}: {e.strerror}") from None
    return run, False


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], root: Path, *, what: str | None = None) -> None:
    """Refuse to resume a run with settings that change its numbers.

    ``what`` names the source of ``saved`` in the message (default: the run in ``root``).
    """
    diffs = [
        f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)
    ]
    if diffs:
        raise FlatnessError(f"--resume: settings differ from {what or f'the run in {root}'} ({'; '.join(diffs[:4])})")

"""The fingerprint of a run: what produced it, recomputed and compared wherever the run is read.

A run records (``config.json`` key ``fingerprint``, and every checkpoint):

- ``code``: per role (``model``, ``data``, ``loss``) the spec; for the user's
  own code (``file.py:fn`` / ``module:fn``) the sha256 of its source file with
  the absolute path and the path relative to the run directory; registry
  names are the toolkit's own code (``versions.flatness``);
- ``data``: per split (``train``, ``test``) the shapes, dtypes and a sha256 of
  the tensors: all rows, or for large data (over :data:`FULL_DIGEST_BYTES`)
  the shapes plus :data:`SAMPLED_ROWS` rows at fixed, evenly spaced indices;
- ``versions`` (flatness, torch, python) and ``device``.

:func:`compare_fingerprints` names what changed: ``code`` or ``data``
(refused unless ``--allow-changed code|data``). Versions and device are
recorded, not enforced: another torch build changes the last bits of a
result, which the recorded versions explain.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path
from typing import Any

import torch

from flatness.data.base import Dataset, Split, map_batch
from flatness.errors import FlatnessError
from flatness.hooks import is_callable_spec
from flatness.provenance.digest import content_digest, file_digest
from flatness.version import __version__

#: Splits up to this many bytes are digested whole; larger ones by shapes plus a fixed sample of rows.
FULL_DIGEST_BYTES = 64 * 2**20
SAMPLED_ROWS = 1024
#: What ``--allow-changed`` accepts.
CHANGE_KINDS = ("code", "data")
ROLES = ("model", "data", "loss")


def versions() -> dict[str, str]:
    """flatness, torch and Python versions of this process."""
    return {"flatness": str(__version__), "torch": str(torch.__version__), "python": platform.python_version()}


def spec_file(spec: str) -> Path | None:
    """The source file a callable spec names (``file.py:fn`` or ``module:fn``); None for registry names or unfindable modules."""
    if not is_callable_spec(spec):
        return None
    target = spec.rpartition(":")[0]
    if target.endswith(".py"):
        path = Path(target).expanduser()
        return path.resolve() if path.is_file() else None
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        return None
    origin = getattr(found, "origin", None)
    return Path(origin).resolve() if origin and os.path.isfile(origin) else None


def code_record(spec: str, run_dir: Path | None) -> dict[str, Any]:
    """What the code of one role was: the spec, and for user code its file, relative path and sha256."""
    path = spec_file(spec)
    if path is None:
        return {"spec": spec, "builtin": not is_callable_spec(spec)}
    rel = os.path.relpath(path, run_dir.resolve()) if run_dir is not None else None
    return {"spec": spec, "file": str(path), "relative_to_run": rel, "sha256": file_digest(path)}


def split_digest(split: Split) -> dict[str, Any]:
    """Shapes, dtypes and sha256 of a split's tensors (whole, or a fixed sample of rows when large)."""
    tensors = split.fields if isinstance(split.fields, dict) else split.fields
    shapes = map_batch(lambda t: [str(t.dtype), list(t.shape)], tensors)
    nbytes = sum(t.numel() * t.element_size() for t in _flat(split.fields))
    n = len(split)
    if nbytes <= FULL_DIGEST_BYTES:
        return {"rows": "all", "n": n, "shapes": shapes, "sha256": content_digest(split.fields)}
    rows = torch.linspace(0, n - 1, min(SAMPLED_ROWS, n)).round().long().unique()
    sample = map_batch(lambda t: t[rows.to(t.device)], split.fields)
    return {"rows": int(rows.numel()), "n": n, "shapes": shapes, "sha256": content_digest([shapes, sample])}


def _flat(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    return list(batch.values()) if isinstance(batch, dict) else list(batch)


def data_record(ds: Dataset) -> dict[str, Any]:
    """The digest of a dataset's training and test splits (as loaded, before any augmentation)."""
    return {"train": split_digest(ds.train), "test": split_digest(ds.test)}


def run_fingerprint(settings: dict[str, Any], ds: Dataset, run_dir: Path | None, device: torch.device | str) -> dict[str, Any]:
    """The fingerprint a run records (see the module docstring)."""
    specs = {"model": settings.get("model"), "data": settings.get("data"), "loss": settings.get("loss")}
    return {
        "code": {role: code_record(str(spec), run_dir) for role, spec in specs.items() if spec is not None},
        "data": data_record(ds),
        "versions": versions(),
        "device": str(torch.device(device).type),
    }


def locate_spec(spec: str, record: dict[str, Any] | None, run_dir: Path | None) -> str:
    """A recorded ``file.py:fn`` spec that resolves from here: as written, else its recorded absolute path, else relative to the run.

    Runs record the spec as typed (relative to the folder ``flatness train``
    ran in); this makes a run directory usable from any folder.
    """
    if not is_callable_spec(spec):
        return spec
    target, _, attr = spec.rpartition(":")
    if not target.endswith(".py") or Path(target).expanduser().is_file() or not record:
        return spec
    candidates = [record.get("file")]
    if run_dir is not None and record.get("relative_to_run"):
        candidates.append(str(Path(run_dir) / record["relative_to_run"]))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return f"{Path(candidate).resolve()}:{attr}"
    return spec


def compare_fingerprints(recorded: dict[str, Any] | None, current: dict[str, Any], *, allow: frozenset[str] | set[str] = frozenset(),
                         what: str, check_data: bool = True) -> list[str]:
    """Refuse a run whose code or data changed since it was trained, unless allowed.

    Args:
        recorded: the run's fingerprint (None for runs of older versions: nothing to compare).
        current: the fingerprint recomputed now (same keys; ``code`` may list fewer roles).
        allow: kinds of change the user accepted (``--allow-changed code|data``).
        what: the run or checkpoint, for messages.
        check_data: False when the user asked for other data on purpose (``--allow-other-data``).

    Returns:
        One note per accepted change (to record beside the numbers).

    Raises:
        FlatnessError: the first unaccepted change, naming what changed and the flag.
    """
    if not recorded:
        return []
    notes: list[str] = []
    for role, now in current.get("code", {}).items():
        then = (recorded.get("code") or {}).get(role)
        if not then or "sha256" not in then or "sha256" not in now or then["sha256"] == now["sha256"]:
            continue
        change = (f"{role} code {now['file']} differs from the {then.get('file')} {what} was trained with "
                  f"(sha256 {then['sha256'][:12]}... then, {now['sha256'][:12]}... now)")
        notes.append(_accept_or_refuse(change, "code", allow))
    if check_data:
        for split in ("train", "test"):
            then = (recorded.get("data") or {}).get(split)
            now = (current.get("data") or {}).get(split)
            if not then or not now or then.get("sha256") == now.get("sha256"):
                continue
            spec = (current.get("code") or {}).get("data", {}).get("spec", "the data")
            change = (f"{spec!r} now gives other {split} samples than {what} was trained on "
                      f"(shapes {then.get('shapes')} -> {now.get('shapes')}, sha256 {str(then.get('sha256'))[:12]}... then, "
                      f"{str(now.get('sha256'))[:12]}... now)")
            notes.append(_accept_or_refuse(change, "data", allow))
    return notes


def _accept_or_refuse(change: str, kind: str, allow: frozenset[str] | set[str]) -> str:
    if kind not in allow:
        raise FlatnessError(f"{change}; pass --allow-changed {kind} to use it anyway")
    return f"accepted with --allow-changed {kind}: {change}"


def parse_allow_changed(values: list[str] | None) -> frozenset[str]:
    """``--allow-changed code,data`` (repeatable, comma-separated, case-insensitive) as a set.

    Raises:
        FlatnessError: an unknown kind.
    """
    kinds = {part.strip().lower() for v in values or [] for part in v.split(",") if part.strip()}
    unknown = sorted(kinds - set(CHANGE_KINDS))
    if unknown:
        raise FlatnessError(f"unknown --allow-changed {unknown[0]!r}; expected one of {', '.join(CHANGE_KINDS)}")
    return frozenset(kinds)

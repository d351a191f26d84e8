"""Settings of a loss surface: one frozen :class:`SurfaceSpec`, validated once.

The CLI builds a spec from its flags, tests and scripts build it directly;
every value is checked in ``__post_init__`` and a mistake raises one
:class:`~flatness.errors.FlatnessError` line naming the flag (the CLI's
spelling) and what was expected. :class:`SurfaceFile` says where a surface
goes and what else the file records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flatness.errors import FlatnessError
from flatness.landscape.evaluate import METHODS
from flatness.landscape.grid import Axis, parse_axis

RANDOM_KINDS = ("filter", "layer", "model")
DIRECTION_KINDS = (*RANDOM_KINDS, "pca", "interp", "hessian", "custom")
HESSIAN_NORMALIZE = ("none", "filter")
# Grid points per axis when --directions pca chooses the grid (no --x / --y): it covers the trajectory.
AUTO_POINTS = {1: 51, 2: 31}


@dataclass(frozen=True)
class SurfaceSpec:
    """What surface to compute (Li et al. 2018): grid, directions, data, evaluation.

    Attributes:
        x: first axis, ``"MIN:MAX:N"``, ``(min, max, n)`` or an :class:`Axis`
            (stored as an ``Axis``). ``None`` only with ``directions="pca"``:
            :func:`~flatness.landscape.surface_from_checkpoint` then picks a
            grid of :data:`AUTO_POINTS` points per axis that covers the
            projected trajectory with a margin (and records it in the file).
        y: second axis (a 2-D surface), or None (with ``pca`` and ``dim=2``: chosen like ``x``).
        dim: 1 or 2; default 2 when ``y`` is given (or the pca grid is chosen). Must agree with ``y``.
        directions: ``filter`` / ``layer`` / ``model`` (seeded random
            directions normalized per filter, layer or whole model), ``pca``
            (of a run's checkpoints), ``interp`` (towards the checkpoints in
            ``to``), ``hessian`` (top Hessian eigenvectors) or ``custom``
            (direction tensors handed to :func:`~flatness.landscape.loss_surface`).
        ignore: ``biasbn`` (zero bias and BatchNorm entries) or ``none``;
            default ``biasbn`` for random directions, ``none`` otherwise.
        seed: seed of random directions and of the Hessian's Lanczos start.
        to: ``interp``: one (1-D) or two (2-D) target checkpoints.
        run: a run directory: the trajectory for ``pca`` (projected on 2-D surfaces).
        hessian_normalize: ``hessian``: ``none`` (unit eigenvectors) or
            ``filter`` (each filter rescaled to the weights' filter norm).
        allow_degenerate: compute even when a direction is zero or the two
            are parallel (refused otherwise).
        split, samples, test, batch_size: the data (first ``samples`` of
            ``split``; ``test`` also evaluates the test split).
        device: ``auto``, ``cpu`` or ``cuda`` (the model, data and loss come
            from the checkpoint or a :class:`flatness.analysis.Sources`).
        chunk_size: grid points evaluated and written together (default: auto).
        method: ``auto``, ``vmap`` or ``loop`` (see :mod:`flatness.landscape.evaluate`).
    """

    x: Axis | str | tuple[float, float, int] | None = None
    y: Axis | str | tuple[float, float, int] | None = None
    dim: int | None = None
    directions: str = "filter"
    ignore: str | None = None
    seed: int = 0
    to: tuple[str, ...] = ()
    run: str | None = None
    hessian_normalize: str = "none"
    allow_degenerate: bool = False
    split: str = "train"
    samples: int | None = None
    test: bool = False
    batch_size: int = 1000
    device: str = "auto"
    chunk_size: int | None = None
    method: str = "auto"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.x is None and self.directions != "pca":
            raise FlatnessError("--x MIN:MAX:N is required (only --directions pca chooses a grid itself, around its trajectory)")
        if self.x is None and self.y is not None:
            raise FlatnessError("give both --x and --y, or neither (--directions pca then picks a grid that covers the trajectory)")
        if self.x is not None:
            set_(self, "x", parse_axis(self.x, "--x"))
        dim = self.dim if self.dim is not None else (2 if (self.y is not None or self.x is None) else 1)
        if dim not in (1, 2):
            raise FlatnessError(f"--dim must be 1 or 2, got {dim}")
        if dim == 2 and self.y is None and self.x is not None:
            raise FlatnessError("--dim 2 needs --y MIN:MAX:N")
        if dim == 1 and self.y is not None:
            raise FlatnessError("--y is only used with --dim 2")
        set_(self, "dim", dim)
        set_(self, "y", parse_axis(self.y, "--y") if self.y is not None else None)
        set_(self, "to", tuple(str(p) for p in self.to))
        self._check_directions()
        if self.ignore is None:
            set_(self, "ignore", "biasbn" if self.directions in RANDOM_KINDS else "none")
        _choice("--ignore", self.ignore, ("biasbn", "none"))
        _choice("--hessian-normalize", self.hessian_normalize, HESSIAN_NORMALIZE)
        _choice("--split", self.split, ("train", "val", "test"))
        if self.split == "test" and self.test:
            set_(self, "test", False)  # the test split is the surface itself
        _choice("--eval-mode", self.method, METHODS)
        for flag, value in (("--samples", self.samples), ("--chunk-size", self.chunk_size), ("--batch-size", self.batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise FlatnessError(f"{flag} must be a positive integer, got {value}")

    def _check_directions(self) -> None:
        _choice("--directions", self.directions, DIRECTION_KINDS)
        if self.to and self.directions != "interp":
            raise FlatnessError(f"--to is only used with --directions interp, not {self.directions!r}")
        if self.directions == "interp" and len(self.to) != self.dim:
            need = "one checkpoint (--to CKPT2)" if self.dim == 1 else "two checkpoints (--to CKPT2 CKPT3)"
            raise FlatnessError(f"--directions interp with --dim {self.dim} needs {need}, got {len(self.to)}")
        if self.hessian_normalize != "none" and self.directions != "hessian":
            raise FlatnessError(f"--hessian-normalize is only used with --directions hessian, not {self.directions!r}")

    @property
    def auto_grid(self) -> bool:
        """True when the grid is still to be chosen from the trajectory (``pca`` without ``x``)."""
        return self.x is None

    @property
    def xs(self) -> np.ndarray:
        if self.x is None:
            raise FlatnessError("the grid is chosen from the trajectory by surface_from_checkpoint; give x (and y) here")
        return self.x.coordinates  # type: ignore[union-attr]

    @property
    def ys(self) -> np.ndarray | None:
        return self.y.coordinates if self.y is not None else None  # type: ignore[union-attr]

    def settings(self) -> dict[str, Any]:
        """The settings a resumed file must share (JSON-ready; output and device choices left out)."""
        keep = ("dim", "directions", "ignore", "hessian_normalize")
        out: dict[str, Any] = {k: getattr(self, k) for k in keep}
        out["x"] = self.x.spec if self.x is not None else None  # type: ignore[union-attr]
        out["y"] = self.y.spec if self.y is not None else None  # type: ignore[union-attr]
        if self.directions in RANDOM_KINDS or self.directions == "hessian":
            out["seed"] = int(self.seed)
        if self.hessian_normalize == "none":
            del out["hessian_normalize"]
        return out

    def to_dict(self) -> dict[str, Any]:
        """``asdict`` with the axes as ``MIN:MAX:N`` strings (the run's config)."""
        d = asdict(self)
        d["x"] = self.x.spec if self.x is not None else None  # type: ignore[union-attr]
        d["y"] = self.y.spec if self.y is not None else None  # type: ignore[union-attr]
        d["to"] = list(self.to)
        return d


@dataclass(frozen=True)
class SurfaceFile:
    """Where a surface is written and what else the file records.

    Attributes:
        path: the .h5 file.
        resume: continue ``path``: only its missing cells are computed, with
            its own directions, chunk size and method (same settings required).
        force: replace an existing ``path``.
        settings: extra settings stored in (and checked against) the file.
        extra: extra arrays stored in the file (trajectory, PCA variances).
    """

    path: Path
    resume: bool = False
    force: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.path.suffix.lower() not in (".h5", ".hdf5"):
            raise FlatnessError(f"--out must be a .h5 file, got {self.path}")
        if self.path.is_dir():
            raise FlatnessError(f"output {self.path} is a folder, expected a .h5 file path")
        if self.path.exists() and not (self.resume or self.force):
            raise FlatnessError(f"output {self.path} already exists; pass --resume to continue it or --force to overwrite it")


def _choice(flag: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise FlatnessError(f"unknown {flag} {value!r}; expected one of {', '.join(allowed)}")

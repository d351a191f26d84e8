"""Surface files (.h5): the layout of DESIGN.md section 5, resumable writes, loss-landscape files.

Layout of a file written here (keys as in tomgoldstein/loss-landscape)::

    /xcoordinates            (nx,)      float64
    /ycoordinates            (ny,)      float64      2-D surfaces only
    /train_loss, /train_acc  (nx,) or (ny, nx) float64, accuracy in %
    /test_loss,  /test_acc   same, when asked
    /xdirection/<k>          one dataset per parameter, model.parameters() order
    /ydirection/<k>          2-D surfaces only
    /proj_xcoord, /proj_ycoord, /proj_epochs     trajectory, when projected
    /explained_variance_ratio_, /explained_variance_, /singular_values_   PCA
    attrs: format, format_version, version, index_order = "xy", dim,
           settings (JSON), chunk_size, method, directions (their kind)

A 2-D array has shape ``(ny, nx)`` and ``[j, i]`` is the value at
``(x_i, y_j)``: the order of ``X, Y = np.meshgrid(x, y)``, which is what
loss-landscape's ``plot_2D`` and matplotlib's ``contour(x, y, Z)`` expect.
Cells not computed yet hold NaN. The file is first written
complete (NaN everywhere) under a temporary name and renamed into place;
after that, each chunk of points is written into the existing datasets and
flushed, so a killed run leaves a readable file whose NaN cells ``--resume``
fills in. While a run writes a file it holds an exclusive lock on it
(:class:`SurfaceLock`), so a second run on the same file is refused.

Older files of this package (flatness < 0.2) have ``index_order = "ij"``:
shape ``(nx, ny)`` with ``[i, j]`` at ``(x_i, y_j)``. :func:`read_surface`
converts them, and :func:`upgrade_to_xy` rewrites one in place (atomically)
before it is resumed. Files written by loss-landscape itself have no
``index_order``, fill missing cells with -1, and put the values of a 2-D grid
in ``np.meshgrid(x, y)`` order: flat index ``j * nx + i`` holds the value at
``(x_i, y_j)`` even though the dataset is allocated with shape ``(nx, ny)``
(their own ``plot_2D`` therefore fails on non-square grids).
:func:`read_surface` converts them as well.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flatness.atomic import atomic_open
from flatness.errors import FlatnessError
from flatness.version import __version__

FORMAT = "flatness-surface"
FORMAT_VERSION = 1
VALUE_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc")
# Results recorded beside the settings (computed, not chosen): not compared on resume.
RESULT_KEYS = ("hessian_eigenvalues",)
EXTRA_KEYS = (
    "proj_xcoord",
    "proj_ycoord",
    "proj_epochs",
    "explained_variance_ratio_",
    "explained_variance_",
    "singular_values_",
)


@dataclass
class Surface:
    """A loss surface in memory, always in "xy" order with NaN for missing cells.

    Attributes:
        xcoordinates: ``(nx,)`` coordinates along the first direction.
        ycoordinates: ``(ny,)`` coordinates along the second direction (None in 1-D).
        values: ``"train_loss"``, ``"train_acc"`` (and ``"test_*"``) arrays of
            shape ``(nx,)`` or ``(ny, nx)``; ``[j, i]`` is the value at ``(x_i, y_j)``
            (``contour(xcoordinates, ycoordinates, values[key])`` draws it).
        directions: the x (and y) directions, one array per parameter.
        settings: what the surface was computed with (empty for foreign files).
        extra: trajectory and PCA arrays (``proj_xcoord``, ``explained_variance_ratio_`` ...).
        source: ``"flatness"`` or ``"loss-landscape"``.
    """

    xcoordinates: np.ndarray
    ycoordinates: np.ndarray | None
    values: dict[str, np.ndarray]
    directions: list[list[np.ndarray]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = "flatness"
    path: Path | None = None

    @property
    def dim(self) -> int:
        return 1 if self.ycoordinates is None else 2

    @property
    def shape(self) -> tuple[int, ...]:
        if self.ycoordinates is None:
            return (len(self.xcoordinates),)
        return (len(self.ycoordinates), len(self.xcoordinates))

    def value_at(self, key: str, x: float, y: float | None = None) -> float:
        """The value of ``key`` at the grid point ``(x, y)`` (nearest coordinates)."""
        i = int(np.abs(self.xcoordinates - x).argmin())
        if self.ycoordinates is None:
            return float(self[key][i])
        j = int(np.abs(self.ycoordinates - (y or 0.0)).argmin())
        return float(self[key][j, i])

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self.values[key]
        except KeyError:
            raise FlatnessError(f"surface has no {key!r}; it holds {', '.join(self.values) or 'no values'}") from None

    @property
    def complete(self) -> bool:
        """True when no cell of any value array is missing."""
        return all(not np.isnan(v).any() for v in self.values.values())

    @property
    def trajectory(self) -> np.ndarray | None:
        """``(T, 2)`` projected checkpoint coordinates, or None."""
        if "proj_xcoord" in self.extra and "proj_ycoord" in self.extra:
            return np.stack([self.extra["proj_xcoord"], self.extra["proj_ycoord"]], axis=1)
        return None

    def default_key(self) -> str:
        """The loss to show by default: ``train_loss``, else the first ``*_loss``."""
        for key in ("train_loss", "test_loss"):
            if key in self.values:
                return key
        for key in self.values:
            if key.endswith("_loss"):
                return key
        raise FlatnessError("surface holds no loss values")


def _normalize(settings: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(settings), sort_keys=True))


def create_surface_file(
    path: str | Path,
    coordinates: tuple[np.ndarray, np.ndarray | None],
    *,
    keys: Sequence[str],
    directions: Sequence[Sequence[np.ndarray]],
    settings: Mapping[str, Any],
    attrs: Mapping[str, str | int],
    extra: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write a new surface file with every value cell NaN, atomically (temp file + rename).

    Args:
        path: the .h5 file.
        coordinates: ``(xcoordinates, ycoordinates)``; ``ycoordinates`` None in 1-D.
        keys: the value arrays (``train_loss`` ...).
        directions: the x (and y) directions, one array per parameter.
        settings: stored as JSON in the ``settings`` attribute (checked on resume).
        attrs: further attributes: ``chunk_size`` and ``method`` (required),
            ``directions``, ``hessian_normalize``.
        extra: extra arrays (trajectory, PCA variances).

    Raises:
        FlatnessError: the folder cannot be written.
    """
    import h5py

    path = Path(path)
    xcoordinates, ycoordinates = coordinates
    nx = len(xcoordinates)
    shape = (nx,) if ycoordinates is None else (len(ycoordinates), nx)
    # The file is built in memory and written with one atomic write: h5py crashes the
    # process (not an exception) when the disk refuses a write mid-way (full disk, file
    # size limit), so the only disk write that can fail is a plain Python one.
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["version"] = __version__
        f.attrs["index_order"] = "xy"
        f.attrs["dim"] = len(shape)
        f.attrs["settings"] = json.dumps(_normalize(settings), sort_keys=True)
        f.attrs["chunk_size"] = int(attrs["chunk_size"])
        for name, value in attrs.items():
            if name != "chunk_size":
                f.attrs[name] = value
        f.create_dataset("xcoordinates", data=np.asarray(xcoordinates, dtype=np.float64))
        if ycoordinates is not None:
            f.create_dataset("ycoordinates", data=np.asarray(ycoordinates, dtype=np.float64))
        for key in keys:
            f.create_dataset(key, data=np.full(shape, np.nan, dtype=np.float64))
        for name, direction in zip(("xdirection", "ydirection"), directions):
            group = f.create_group(name)
            for k, arr in enumerate(direction):
                group.create_dataset(str(k), data=np.asarray(arr))
        for key, arr in (extra or {}).items():
            f.create_dataset(key, data=np.asarray(arr))
    created = [p for p in reversed(path.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as out:
            out.write(image.getbuffer())
    except OSError as e:
        for folder in reversed(created):  # leave no new empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise FlatnessError(f"cannot write {path}: {e.strerror or e}") from None


def _open(path: Path, mode: str = "r") -> Any:
    import h5py

    if not path.exists():
        raise FlatnessError(f"surface file {path} does not exist")
    if not path.is_file():
        raise FlatnessError(f"surface file {path} is not a file")
    try:
        return h5py.File(path, mode)
    except OSError as e:
        raise FlatnessError(f"{path} cannot be opened as an HDF5 surface file: {str(e).splitlines()[0]}") from None


def stored_settings(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(settings, attrs)`` of a file written here.

    Raises:
        FlatnessError: not an HDF5 file, or not a flatness surface file.
    """
    path = Path(path)
    with _open(path) as f:
        if f.attrs.get("format") != FORMAT:
            raise FlatnessError(f"{path} is not a surface file written by flatness; cannot resume it (pass --force to replace it)")
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return json.loads(attrs["settings"]), attrs


def check_resume(path: str | Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse to resume ``path`` if it was made with other ``settings``; return its attributes.

    Raises:
        FlatnessError: naming each setting that differs, old vs new.
    """
    old, attrs = stored_settings(path)
    new = _normalize(settings)
    diff = [k for k in sorted(set(old) | set(new)) if k not in RESULT_KEYS and old.get(k) != new.get(k)]
    if diff:
        detail = "; ".join(f"{k}: {_short(old.get(k))} in the file, {_short(new.get(k))} now" for k in diff[:4])
        more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
        raise FlatnessError(f"cannot resume {path}: it was made with other settings ({detail}{more}); pass --force to start over")
    return attrs


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def missing_mask(path: str | Path, keys: Sequence[str]) -> np.ndarray:
    """Flat boolean mask over grid points: True where any of ``keys`` is NaN."""
    with _open(Path(path)) as f:
        mask = None
        for key in keys:
            m = np.isnan(np.asarray(f[key][()], dtype=np.float64)).reshape(-1)
            mask = m if mask is None else (mask | m)
    if mask is None:
        raise ValueError("no keys given")
    return mask


class SurfaceWriter:
    """Writes chunks of computed points into an existing surface file, flushing after each.

    Keeps a full copy of the value arrays in memory; a chunk's rows are
    written from it in one slice per key.
    """

    def __init__(self, path: str | Path, keys: Sequence[str]) -> None:
        self.path = Path(path)
        self.keys = list(keys)
        self._file = _open(self.path, "r+")
        self.values = {k: np.asarray(self._file[k][()], dtype=np.float64) for k in self.keys}
        self.shape = self.values[self.keys[0]].shape

    def write(self, points: np.ndarray, rows: Mapping[str, np.ndarray]) -> None:
        """Store ``rows[key][n]`` at flat grid index ``points[n]`` for each key, then flush."""
        points = np.asarray(points, dtype=np.int64)
        if points.size == 0:
            return
        for key in self.keys:
            flat = self.values[key].reshape(-1)
            flat[points] = rows[key]
            if len(self.shape) == 1:
                lo, hi = int(points.min()), int(points.max()) + 1
                self._file[key][lo:hi] = self.values[key][lo:hi]
            else:
                ncols = self.shape[1]
                lo, hi = int(points.min()) // ncols, int(points.max()) // ncols + 1
                self._file[key][lo:hi, :] = self.values[key][lo:hi, :]
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SurfaceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[Any]:
    f = _open(path)
    try:
        yield f
    finally:
        f.close()


def _ll_convert(arr: np.ndarray, nx: int, ny: int | None) -> np.ndarray:
    """A loss-landscape value array -> "xy" order ``(ny, nx)`` with NaN for the -1 marks."""
    arr = np.asarray(arr, dtype=np.float64).copy()
    arr[arr == -1] = np.nan
    if ny is None:
        return arr.reshape(nx)
    if arr.size != nx * ny:
        raise FlatnessError(f"loss-landscape array has {arr.size} values, expected {nx} x {ny}")
    # Their flat index j * nx + i holds (x_i, y_j): meshgrid order, whatever the allocated shape.
    return arr.reshape(-1).reshape(ny, nx).copy()


def read_surface(path: str | Path) -> Surface:
    """Read a surface file written here or by loss-landscape, in "xy" order with NaN for missing cells.

    Raises:
        FlatnessError: missing, not HDF5, or without ``xcoordinates``.

    Example:
        >>> s = read_surface("surface.h5")  # doctest: +SKIP
        >>> s["train_loss"].shape            # doctest: +SKIP
        (41, 51)
    """
    path = Path(path)
    try:
        return _read_surface(path)
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
        # shapes that do not fit the coordinates, non-numeric data, broken settings
        msg = " ".join(str(e).split()) or type(e).__name__
        raise FlatnessError(f"{path} is not a valid surface file: {msg}") from None


def _read_surface(path: Path) -> Surface:
    with _reading(path) as f:
        if "xcoordinates" not in f:
            raise FlatnessError(f"{path} is not a loss surface file: it has no 'xcoordinates'")
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        xs = np.asarray(f["xcoordinates"][()], dtype=np.float64).reshape(-1)
        ys = np.asarray(f["ycoordinates"][()], dtype=np.float64).reshape(-1) if "ycoordinates" in f else None
        nx, ny = len(xs), (None if ys is None else len(ys))
        order = attrs.get("index_order")
        values: dict[str, np.ndarray] = {}
        keys = [k for k in VALUE_KEYS if k in f] + [
            k for k in f if k not in VALUE_KEYS and (k.endswith("_loss") or k.endswith("_acc") or k.endswith("_err"))
        ]
        for key in keys:
            raw = np.asarray(f[key][()], dtype=np.float64)
            if order is None:
                values[key] = _ll_convert(raw, nx, ny)
            elif order == "ij":  # flatness < 0.2: shape (nx, ny)
                values[key] = raw.reshape(nx) if ny is None else raw.reshape(nx, ny).T.copy()
            elif order == "xy":  # meshgrid layout, shape (ny, nx)
                values[key] = raw.reshape((nx,) if ny is None else (ny, nx))
            else:
                raise FlatnessError(f"{path} has index_order {order!r}; expected 'ij' or 'xy'")
        directions = []
        for name in ("xdirection", "ydirection"):
            if name in f and hasattr(f[name], "keys"):
                group = f[name]
                directions.append([np.asarray(group[str(k)][()]) for k in range(len(group))])
        extra = {k: np.asarray(f[k][()]) for k in EXTRA_KEYS if k in f}
        settings = json.loads(attrs["settings"]) if "settings" in attrs else {}
    return Surface(
        xcoordinates=xs,
        ycoordinates=ys,
        values=values,
        directions=directions,
        settings=settings,
        extra=extra,
        source="flatness" if attrs.get("format") == FORMAT else ("loss-landscape" if order is None else "other"),
        path=path,
    )


def upgrade_to_xy(path: str | Path) -> bool:
    """Rewrite an older "ij" surface file of this package in "xy" order, atomically.

    Every value dataset of a 2-D file is transposed to ``(ny, nx)`` and the
    attribute set to ``"xy"``; a 1-D file only gets the attribute. The new
    file is written beside the old and renamed over it, so a failure leaves
    the old one as it was.

    Returns:
        True when the file was converted, False when it already was "xy".
    """
    import h5py

    path = Path(path)
    with _reading(path) as f:
        order = f.attrs.get("index_order")
        order = order.decode() if isinstance(order, bytes) else order
        if order != "ij":
            return False
    image = io.BytesIO(path.read_bytes())
    with h5py.File(image, "r+") as f:
        two_d = "ycoordinates" in f
        for key in [k for k in f if isinstance(f[k], h5py.Dataset) and (k.endswith("_loss") or k.endswith("_acc"))]:
            data = np.asarray(f[key][()])
            if two_d:
                del f[key]
                f.create_dataset(key, data=np.ascontiguousarray(data.T))
        f.attrs["index_order"] = "xy"
    try:
        with atomic_open(path, "wb") as out:
            out.write(image.getbuffer())
    except OSError as e:
        raise FlatnessError(f"cannot rewrite {path} in the current layout: {e.strerror or e}") from None
    return True


class SurfaceLock:
    """An exclusive lock on a surface file while a run writes it (Linux open-file-description lock).

    Taken with ``F_OFD_SETLK`` on a descriptor of the file itself, so no lock
    file is left behind by a killed run (the kernel drops the lock with the
    process), HDF5's own ``flock`` in the same process does not conflict, and
    closing other descriptors of the file does not release it.

    Where the platform has no such locks (not Linux), no lock is taken.

    Raises:
        FlatnessError: another process holds the lock.
    """

    def __init__(self, path: str | Path) -> None:
        import os
        import struct

        try:
            import fcntl
        except ImportError:  # Windows
            fcntl = None  # type: ignore[assignment]
        self.path = Path(path)
        self._fd: int | None = None
        if fcntl is None or not hasattr(fcntl, "F_OFD_SETLK"):
            return
        self._fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise FlatnessError(
                f"{self.path} is being written by another flatness process; wait for it to finish (or stop it) and run again"
            ) from None

    def release(self) -> None:
        import os

        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SurfaceLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

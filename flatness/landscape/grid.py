"""Grid axes: ``MIN:MAX:N`` specs, coordinates and the flat point order.

A 2-D grid of ``nx`` by ``ny`` points is enumerated in C order over the
``(ny, nx)`` array of the surface file ("xy" order, that of ``np.meshgrid(x, y)``),
so flat point ``p`` is the cell ``[p // nx, p % nx]`` holding the value at
``(x_{p % nx}, y_{p // nx})``. Chunks of points are
contiguous ranges of flat indices; the chunking is a pure function of the
grid and the chunk size, which is what makes resumed and multi-process runs
compute exactly the same numbers as a single uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flatness.errors import FlatnessError


@dataclass(frozen=True)
class Axis:
    """One grid axis: ``num`` points from ``lo`` to ``hi`` inclusive (``np.linspace``)."""

    lo: float
    hi: float
    num: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            raise FlatnessError(f"grid bounds must be finite numbers, got MIN={self.lo} and MAX={self.hi}")
        if self.num <= 0:
            raise FlatnessError(f"grid size N must be a positive integer, got {self.num}")
        if self.num == 1:  # linspace(MIN, MAX, 1) is MIN alone: a one-point "axis" is never what was meant
            raise FlatnessError(f"grid size N=1 computes MIN={self.lo:g} only; ask for N >= 2 points from MIN to MAX")
        if self.lo >= self.hi:
            raise FlatnessError(f"grid MIN must be smaller than MAX, got MIN={self.lo:g} and MAX={self.hi:g}")

    @property
    def coordinates(self) -> np.ndarray:
        """The ``num`` coordinates as float64 (``np.linspace(lo, hi, num)``)."""
        return np.linspace(self.lo, self.hi, num=self.num)

    @property
    def zero_index(self) -> int | None:
        """Index of the coordinate 0 (the centre) when it is a grid point, else None."""
        xs = self.coordinates
        i = int(np.abs(xs).argmin())
        return i if abs(float(xs[i])) <= 1e-9 * (self.hi - self.lo) else None

    @property
    def spec(self) -> str:
        return f"{self.lo:g}:{self.hi:g}:{self.num}"


def parse_axis(text: str | Axis | tuple[float, float, int], flag: str = "--x") -> Axis:
    """Parse ``"MIN:MAX:N"`` (as in loss-landscape's ``--x=-1:1:51``) into an :class:`Axis`.

    Args:
        text: the spec, or an ``Axis`` / ``(min, max, n)`` tuple passed through.
        flag: the option name used in error messages.

    Raises:
        FlatnessError: not three fields, non-numeric bounds, ``N`` not an
            integer >= 2, or ``MIN >= MAX``.

    Example:
        >>> parse_axis("-1:1:5").coordinates
        array([-1. , -0.5,  0. ,  0.5,  1. ])
    """
    if isinstance(text, Axis):
        return text
    if isinstance(text, tuple):
        lo, hi, num = text
        return Axis(float(lo), float(hi), int(num))
    parts = str(text).split(":")
    if len(parts) != 3:
        raise FlatnessError(f"{flag} expects MIN:MAX:N (e.g. -1:1:51), got {text!r}")
    try:
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise FlatnessError(f"{flag} expects numbers for MIN and MAX in MIN:MAX:N, got {text!r}") from None
    try:
        num = int(parts[2])
    except ValueError:
        raise FlatnessError(f"{flag} expects an integer N in MIN:MAX:N, got {text!r}") from None
    try:
        return Axis(lo, hi, num)
    except FlatnessError as e:
        raise FlatnessError(f"{flag} {text}: {e}") from None


def grid_points(xs: np.ndarray, ys: np.ndarray | None) -> np.ndarray:
    """All grid points as a ``(P, k)`` float64 array in flat (C, "xy") order.

    ``k`` is 1 for a 1-D grid and 2 for a 2-D grid; row ``p`` of a 2-D grid is
    ``(xs[p % nx], ys[p // nx])``, the order of ``np.meshgrid(xs, ys)``.
    """
    if ys is None:
        return np.asarray(xs, dtype=np.float64).reshape(-1, 1)
    gx, gy = np.meshgrid(xs, ys, indexing="xy")
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float64)


def chunk_ranges(num_points: int, chunk_size: int) -> list[range]:
    """Split ``range(num_points)`` into consecutive chunks of ``chunk_size`` (the last may be shorter)."""
    if chunk_size <= 0:
        raise ValueError(f"Invalid chunk_size value: {chunk_size}")
    return [range(s, min(s + chunk_size, num_points)) for s in range(0, num_points, chunk_size)]

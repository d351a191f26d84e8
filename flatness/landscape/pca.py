r"""PCA directions of a training trajectory and the projection of checkpoints onto directions.

Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets", section 7:
random directions are nearly orthogonal to the optimization path in high
dimensions, so to *see* the path they take the principal components of

.. math::

    M = \begin{bmatrix} \theta_1 - \theta_c \\ \vdots \\ \theta_T - \theta_c \end{bmatrix},

the checkpoints relative to the centre (the final weights), and draw the
path projected onto the plane of the first two components over the contour
of the loss in that plane.

As in loss-landscape (which uses ``sklearn.decomposition.PCA``) the rows are
centred before the decomposition; we compute it from the ``T x T`` Gram
matrix, parameter block by parameter block, so a trajectory of a large model
never needs one ``T x D`` float64 matrix. Components are unit vectors with
the sign fixed so that each component's largest-magnitude entry is positive
(the convention of scikit-learn's ``svd_flip``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flatness.errors import FlatnessError
from flatness.landscape.directions import Direction, apply_ignore
from flatness.landscape.grid import Axis

_EPOCH = re.compile(r"^epoch_(\d+)\.pt$")


@dataclass
class PCAResult:
    """Principal directions of a trajectory.

    Attributes:
        directions: ``n_components`` unit-norm directions in parameter shapes.
        explained_variance_ratio: fraction of the trajectory's variance along
            each direction (loss-landscape's ``explained_variance_ratio_``).
        explained_variance: variance along each direction (``/(T - 1)``).
        singular_values: singular values of the centred matrix.
    """

    directions: list[Direction]
    explained_variance_ratio: np.ndarray
    explained_variance: np.ndarray
    singular_values: np.ndarray


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The ``checkpoints/epoch_XXXX.pt`` files of a run directory, in epoch order.

    Raises:
        FlatnessError: not a folder, or no epoch checkpoints in it.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FlatnessError(f"run directory {run_dir} does not exist or is not a folder")
    folder = run_dir / "checkpoints"
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = _EPOCH.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
    if not found:
        raise FlatnessError(f"run directory {run_dir} has no checkpoints/epoch_XXXX.pt files to take a trajectory from")
    return [p for _, p in sorted(found)]


def _rows(center: Sequence[Tensor], trajectory: Sequence[Sequence[Tensor]], ignore: str) -> list[list[Tensor]]:
    """Per checkpoint, the (masked) difference to the centre as float64 CPU tensors."""
    rows = []
    for t, weights in enumerate(trajectory):
        if len(weights) != len(center):
            raise ValueError(f"checkpoint {t} of the trajectory has {len(weights)} tensors but the centre has {len(center)}")
        diff = [w.detach().to("cpu", torch.float64) - c.detach().to("cpu", torch.float64) for w, c in zip(weights, center)]
        rows.append(apply_ignore(diff, ignore))
    return rows


def pca_directions(
    center: Sequence[Tensor],
    trajectory: Sequence[Sequence[Tensor]],
    *,
    n_components: int = 2,
    ignore: str = "none",
) -> PCAResult:
    r"""The first ``n_components`` principal directions of ``trajectory`` relative to ``center``.

    Args:
        center: the centre weights :math:`\theta_c` (one tensor per parameter).
        trajectory: the checkpoints' weights, in training order. If none of
            them equals the centre, the centre is added as one more point.
        n_components: how many directions (1 or 2 for a surface).
        ignore: ``"biasbn"`` zeroes one-dimensional parameters in the
            differences (and so in the directions), ``"none"`` keeps them.

    Returns:
        A :class:`PCAResult` whose directions have the centre's dtypes and devices.

    Raises:
        FlatnessError: fewer distinct points than ``n_components + 1``.
    """
    if n_components < 1:
        raise ValueError(f"Invalid n_components value: {n_components}")
    if not trajectory:
        raise FlatnessError("PCA directions need a trajectory of at least one checkpoint")
    rows = _rows(center, trajectory, ignore)
    if not any(all(bool((d == 0).all()) for d in row) for row in rows):
        rows.append([torch.zeros_like(d) for d in rows[0]])
    T = len(rows)
    n_params = len(center)
    means = [torch.stack([row[i] for row in rows]).mean(0) for i in range(n_params)]
    gram = torch.zeros(T, T, dtype=torch.float64)
    for i in range(n_params):
        block = torch.stack([row[i].reshape(-1) for row in rows]) - means[i].reshape(1, -1)
        gram += block @ block.T
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    total = float(evals.sum())
    rank_tol = max(total, 1e-300) * 1e-12
    if T - 1 < n_components or float(evals[n_components - 1]) <= rank_tol:
        raise FlatnessError(
            f"PCA of the trajectory needs at least {n_components + 1} distinct checkpoints (the centre included) "
            f"for {n_components} direction(s); got {T} point(s) spanning fewer dimensions"
        )
    s = evals[:n_components].sqrt()
    u = evecs[:, :n_components]
    comps = []
    for k in range(n_components):
        comp = []
        for i in range(n_params):
            block = torch.stack([row[i].reshape(-1) for row in rows]) - means[i].reshape(1, -1)
            comp.append((block.T @ u[:, k] / s[k]).reshape(center[i].shape))
        flat = torch.cat([c.reshape(-1) for c in comp])
        sign = 1.0 if float(flat[flat.abs().argmax()]) >= 0 else -1.0
        comps.append([(sign * c).to(dtype=center[i].dtype, device=center[i].device) for i, c in enumerate(comp)])
    ev = evals[:n_components].numpy()
    return PCAResult(
        directions=comps,
        explained_variance_ratio=ev / total,
        explained_variance=ev / max(T - 1, 1),
        singular_values=s.numpy(),
    )


def project_trajectory(
    center: Sequence[Tensor],
    trajectory: Sequence[Sequence[Tensor]],
    directions: Sequence[Sequence[Tensor]],
) -> np.ndarray:
    r"""Coordinates of each checkpoint in the plane (or on the line) of ``directions``.

    Solves the least-squares problem
    :math:`\min_c \lVert \sum_k c_k \delta_k - (\theta_t - \theta_c) \rVert`
    for each checkpoint :math:`t`; for orthonormal directions (PCA) this is
    the dot product :math:`c_k = \langle \theta_t - \theta_c, \delta_k \rangle`,
    loss-landscape's "cos" projection.

    Returns:
        A ``(T, len(directions))`` float64 array.
    """
    k = len(directions)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for a in range(k):
        for b in range(k):
            gram[a, b] = sum((da.to("cpu", torch.float64) * db.to("cpu", torch.float64)).sum() for da, db in zip(directions[a], directions[b]))
    coords = np.zeros((len(trajectory), k))
    for t, weights in enumerate(trajectory):
        rhs = torch.zeros(k, dtype=torch.float64)
        for a in range(k):
            rhs[a] = sum(
                ((w.detach().to("cpu", torch.float64) - c.detach().to("cpu", torch.float64)) * d.to("cpu", torch.float64)).sum()
                for w, c, d in zip(weights, center, directions[a])
            )
        coords[t] = torch.linalg.lstsq(gram, rhs.unsqueeze(1)).solution.squeeze(1).numpy()
    return coords


def covering_axes(coords: np.ndarray, num: int, *, margin: float = 0.2) -> list[Axis]:
    r"""Grid axes that cover projected trajectory points (and the centre) with a margin.

    For each column :math:`k` of ``coords`` the axis runs from
    :math:`\min(c_k, 0) - m\,s_k` to :math:`\max(c_k, 0) + m\,s_k`, where
    :math:`s_k` is that span and :math:`m` the ``margin``, so the whole path
    and the centre at the origin sit inside the plotted surface.

    Args:
        coords: ``(T, k)`` coordinates from :func:`project_trajectory`.
        num: points per axis.
        margin: the extra room on each side, as a fraction of the span.

    Example:
        >>> [a.spec for a in covering_axes(np.array([[-4.0, 1.0], [0.0, 0.0]]), 5, margin=0.25)]
        ['-5:1:5', '-0.25:1.25:5']
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(len(coords), -1)
    axes = []
    for k in range(coords.shape[1]):
        lo, hi = min(float(coords[:, k].min()), 0.0), max(float(coords[:, k].max()), 0.0)
        span = hi - lo if hi > lo else 1.0
        axes.append(Axis(float(f"{lo - margin * span:.4g}"), float(f"{hi + margin * span:.4g}"), int(num)))
    return axes

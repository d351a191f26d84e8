"""Loss-surface figures: 1-D curve, contour, filled contour, heatmap, 3-D surface, trajectory.

The figures of Li et al. 2018, "Visualizing the Loss Landscape of Neural
Nets", drawn from a surface file (ours or loss-landscape's, see
:func:`flatness.landscape.read_surface`). Matplotlib is imported inside the
functions and used through its object-oriented API on an Agg canvas, so no
pyplot state or GUI backend is involved. The format follows the output's
suffix (``.png``, ``.pdf`` or ``.svg``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flatness.errors import FlatnessError
from flatness.landscape.storage import Surface, read_surface

KINDS = ("line", "contour", "filled", "heatmap", "3d")
FORMATS = (".png", ".pdf", ".svg")

_PC_NAMES = ("1st PC", "2nd PC")


def _figure(figsize: tuple[float, float] = (6.0, 4.8)) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _check_out(out: Path) -> None:
    if out.suffix.lower() not in FORMATS:
        raise FlatnessError(f"figure {out} must end in .png, .pdf or .svg")


def _axis_labels(surface: Surface) -> tuple[str, str]:
    ratio = surface.extra.get("explained_variance_ratio_")
    if ratio is not None and len(ratio) >= surface.dim:
        labels = [f"{_PC_NAMES[k]}: {100 * float(ratio[k]):.2f} %" for k in range(surface.dim)]
        return labels[0], labels[1] if surface.dim == 2 else ""
    kind = surface.settings.get("directions")
    if kind == "interp":
        return "interpolation coefficient x", "interpolation coefficient y"
    if kind == "hessian":
        return _hessian_axis_label(surface, 0), _hessian_axis_label(surface, 1)
    return "x (direction 1)", "y (direction 2)"


def _hessian_axis_label(surface: Surface, k: int) -> str:
    """What the saved axis is: the unit eigenvector ``v_k``, or its filter-normalized rescaling (norm given)."""
    values = list(surface.settings.get("hessian_eigenvalues") or [])
    lam = f"λ{k + 1} = {values[k]:.3g}" if k < len(values) else ""
    if surface.settings.get("hessian_normalize") == "filter":
        norm = ""
        if k < len(surface.directions):
            norm = f"norm {float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in surface.directions[k]))):.3g}, "
        return f"Hessian eigenvector {k + 1}, filter-normalized\n({norm}{lam + ' of the unit vector' if lam else 'rescaled'})"
    return f"Hessian eigenvector {k + 1} (unit, {lam})" if lam else f"Hessian eigenvector {k + 1} (unit)"


def _samples_note(surface: Surface) -> str:
    """``"\n1000 train samples (test: 1000), eval mode"`` from the file's settings; empty for files that do not say."""
    n, split = surface.settings.get("samples"), surface.settings.get("split", "train")
    if not isinstance(n, int):
        return ""
    test = surface.settings.get("test_samples")
    return f"\n{n} {split} samples" + (f" (test: {test})" if isinstance(test, int) else "") + ", eval mode"


def _missing_note(values: np.ndarray) -> str:
    missing = int(np.isnan(values).sum())
    return f" (incomplete: {missing} of {values.size} cells missing)" if missing else ""


def _transform(z: np.ndarray, log: bool, key: str) -> tuple[np.ndarray, str]:
    if not log:
        return z, key
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log10(np.where(z > 0, z, np.nan))
    return out, f"log10 {key}"


def _levels(z: np.ndarray, vmax: float | None, n: int = 16) -> np.ndarray:
    r"""Contour levels from the minimum up to ``vmax`` (default: the 95th percentile).

    Spaced quadratically, :math:`z_k = z_{min} + (z_{top} - z_{min}) (k / n)^2`:
    around a quadratic minimum the iso-lines then fall at evenly spaced
    distances, so the basin is as visible as the walls.
    """
    finite = z[np.isfinite(z)]
    if finite.size == 0:
        raise FlatnessError("the surface has no computed cells to plot yet")
    lo = float(finite.min())
    hi = float(vmax) if vmax is not None else float(np.percentile(finite, 95))
    if not hi > lo:
        hi = float(finite.max()) if float(finite.max()) > lo else lo + 1.0
    k = np.arange(0, n + 1, dtype=np.float64) / n
    return np.unique(lo + (hi - lo) * k**2)


def surface_figure(
    surface: Surface | str | Path,
    *,
    kind: str | None = None,
    key: str | None = None,
    log: bool = False,
    trajectory: bool = False,
    vmax: float | None = None,
    title: str | None = None,
) -> Any:
    """The matplotlib ``Figure`` of a surface (no file written; see :func:`plot_surface`).

    Args:
        surface: a :class:`~flatness.landscape.Surface` or the path of a surface file.
        kind: ``"line"`` (1-D: loss and accuracy against x), ``"contour"``
            (labelled iso-loss lines), ``"filled"`` (filled contour with a
            colour bar), ``"heatmap"`` or ``"3d"``. Default: ``line`` for 1-D
            surfaces, ``contour`` for 2-D.
        key: the value to draw on 2-D kinds (default ``train_loss``).
        log: logarithmic loss axis (1-D) or log10 of the values (2-D).
        trajectory: draw the projected training trajectory (2-D contour kinds
            and heatmap), labelling PCA axes with their explained variance.
        vmax: top contour level / colour limit (default: the 95th percentile);
            a finite number above the surface's minimum.
        title: figure title (default: the key and directions).

    Returns:
        A ``matplotlib.figure.Figure`` on an Agg canvas.

    Raises:
        FlatnessError: unknown kind, a kind that does not fit the surface's
            dimension, no trajectory in the file, or a bad ``vmax``.
    """
    if not isinstance(surface, Surface):
        surface = read_surface(surface)
    if kind is None:
        kind = "line" if surface.dim == 1 else "contour"
    if kind not in KINDS:
        raise FlatnessError(f"unknown plot kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "line" and surface.dim != 1:
        raise FlatnessError("--kind line needs a 1-D surface; this one is 2-D (use contour, filled, heatmap or 3d)")
    if kind != "line" and surface.dim != 2:
        raise FlatnessError(f"--kind {kind} needs a 2-D surface; this one is 1-D (use --kind line)")
    if trajectory and surface.trajectory is None:
        raise FlatnessError("the surface file has no trajectory: compute it with --run RUN_DIR (and --dim 2)")
    if trajectory and kind == "3d":
        raise FlatnessError("--trajectory is drawn on contour, filled and heatmap plots, not on 3d")
    if vmax is not None and not np.isfinite(vmax):
        raise FlatnessError(f"--vmax must be a finite number, got {vmax}")
    if kind == "line":
        if vmax is not None:
            raise FlatnessError("--vmax applies to 2-D kinds (contour, filled, heatmap, 3d), not to --kind line")
        if key is not None:
            raise FlatnessError(f"--key applies to 2-D kinds; a 1-D line plot draws every value it holds ({', '.join(surface.values)})")
        return _plot_line(surface, log=log, title=title)
    key = key or surface.default_key()
    if vmax is not None:
        _check_vmax(surface[key], vmax, log)
    return _plot_2d(surface, kind, key=key, log=log, trajectory=trajectory, vmax=vmax, title=title)


def _check_vmax(values: np.ndarray, vmax: float, log: bool) -> None:
    finite = values[np.isfinite(values)]
    if log and vmax <= 0:
        raise FlatnessError(f"--vmax must be positive with --log, got {vmax:g}")
    if finite.size and not vmax > float(finite.min()):
        raise FlatnessError(f"--vmax {vmax:g} is not above the surface's minimum {float(finite.min()):.4g}; nothing would be drawn")


def plot_surface(
    surface: Surface | str | Path,
    out: str | Path,
    *,
    kind: str | None = None,
    key: str | None = None,
    log: bool = False,
    trajectory: bool = False,
    vmax: float | None = None,
    title: str | None = None,
) -> Any:
    """Draw a surface into ``out`` (``.png``, ``.pdf`` or ``.svg``, 150 dpi) and return the Figure.

    Arguments as for :func:`surface_figure`.
    Folders of ``out`` that had to be made are removed again if the write fails.

    Raises:
        FlatnessError: as :func:`surface_figure`, a bad output suffix, or a failed write.
    """
    out = Path(out)
    _check_out(out)
    fig = surface_figure(surface, kind=kind, key=key, log=log, trajectory=trajectory, vmax=vmax, title=title)
    save_figure(fig, out)
    return fig


def save_figure(fig: Any, out: Path, *, dpi: int = 150) -> None:
    """``fig.savefig(out)``, making missing folders and removing them again when the write fails."""
    import contextlib

    created = [p for p in reversed(out.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi, bbox_inches="tight")
    except OSError as e:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise FlatnessError(f"cannot write figure {out}: {e.strerror or e}") from None


def _plot_line(surface: Surface, *, log: bool, title: str | None) -> Any:
    fig = _figure()
    ax = fig.add_subplot()
    acc_ax = ax.twinx()
    x = surface.xcoordinates
    handles = []
    for split, style in (("train", "-"), ("test", "--")):
        if f"{split}_loss" in surface.values:
            (h,) = ax.plot(x, surface[f"{split}_loss"], style, color="tab:blue", lw=1.5, label=f"{split} loss")
            handles.append(h)
        if f"{split}_acc" in surface.values:
            (h,) = acc_ax.plot(x, surface[f"{split}_acc"], style, color="tab:red", lw=1.2, label=f"{split} accuracy")
            handles.append(h)
    if log:
        ax.set_yscale("log")
    xlabel, _ = _axis_labels(surface)
    ax.set_xlabel(xlabel)
    ax.set_xlim(float(x.min()), float(x.max()))
    ax.set_ylabel("loss", color="tab:blue")
    ax.tick_params(axis="y", colors="tab:blue")
    acc_ax.set_ylabel("accuracy (%)", color="tab:red")
    acc_ax.tick_params(axis="y", colors="tab:red")
    acc_ax.set_ylim(0, 100)
    # below the axes, under the x label: a legend inside would sit on the curves
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=4, frameon=False)
    note = _missing_note(surface[surface.default_key()])
    ax.set_title(title or f"loss along {_direction_name(surface)}{note}{_samples_note(surface)}", fontsize=10)  # "direction" for foreign files
    return fig


def _direction_name(surface: Surface) -> str:
    kind = surface.settings.get("directions")
    names = {
        "filter": "filter-normalized random direction",
        "layer": "layer-normalized random direction",
        "model": "model-normalized random direction",
        "pca": "PCA direction",
        "interp": "interpolation",
        "hessian": "top Hessian eigenvector direction",
    }
    if kind == "hessian" and surface.settings.get("hessian_normalize") == "filter":
        return "filter-normalized Hessian eigenvector direction"
    return names.get(kind, "direction")


def _outside(traj: np.ndarray, surface: Surface) -> bool:
    """True when a trajectory point lies outside the computed grid."""
    xs, ys = surface.xcoordinates, surface.ycoordinates
    return bool((traj[:, 0] < xs.min()).any() or (traj[:, 0] > xs.max()).any() or (traj[:, 1] < ys.min()).any()
                or (traj[:, 1] > ys.max()).any())


def _plot_2d(surface: Surface, kind: str, *, key: str, log: bool, trajectory: bool, vmax: float | None, title: str | None) -> Any:
    X, Y = np.meshgrid(surface.xcoordinates, surface.ycoordinates)  # "xy": values[key][j, i] is at (x_i, y_j)
    raw = surface[key]
    Z, label = _transform(raw, log, key)
    top = (np.log10(vmax) if (log and vmax is not None and vmax > 0) else vmax)
    levels = _levels(Z, top)
    xlabel, ylabel = _axis_labels(surface)
    note = _missing_note(raw)
    name = _direction_name(surface)
    heading = title or ((f"{label}, {name}s{note}" if name != "direction" else f"{label}{note}") + _samples_note(surface))
    fig = _figure((6.0, 5.0) if kind != "3d" else (6.5, 5.2))
    if kind == "3d":
        from matplotlib.ticker import MaxNLocator

        ax = fig.add_subplot(projection="3d")
        Zc = np.clip(Z, None, top) if top is not None else Z
        surf = ax.plot_surface(X, Y, Zc, cmap="viridis", linewidth=0, antialiased=True, rcount=100, ccount=100)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_locator(MaxNLocator(5))
        fig.colorbar(surf, ax=ax, shrink=0.6, pad=0.1, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_zlabel(label)
        ax.view_init(elev=35, azim=-60)
        ax.set_title(heading, fontsize=10)
        return fig
    ax = fig.add_subplot()
    Zm = np.ma.masked_invalid(Z)
    if kind == "contour":
        cs = ax.contour(X, Y, Zm, levels=levels, cmap="viridis", linewidths=0.9)
        ax.clabel(cs, inline=True, fontsize=7, fmt="%.3g")
    elif kind == "filled":
        from matplotlib.colors import BoundaryNorm

        norm = BoundaryNorm(levels, ncolors=256, extend="max")  # one distinct colour per band
        cs = ax.contourf(X, Y, Zm, levels=levels, cmap="viridis", norm=norm, extend="max")
        fig.colorbar(cs, ax=ax, label=label, format="%.3g")
    else:  # heatmap
        mesh = ax.pcolormesh(X, Y, Zm, cmap="viridis", shading="nearest", vmin=levels[0], vmax=levels[-1])
        fig.colorbar(mesh, ax=ax, label=label, extend="max")
    ax.plot([0], [0], marker="*", color="black" if kind == "contour" else "white", ms=9, ls="none", label="centre")
    traj = surface.trajectory if trajectory else None
    if traj is not None:
        ax.plot(traj[:, 0], traj[:, 1], marker=".", color="tab:red", lw=1.2, ms=5, label="trajectory")
        ax.plot(traj[:1, 0], traj[:1, 1], marker="o", color="tab:red", ms=6, ls="none")
        epochs = surface.extra.get("proj_epochs")
        if epochs is not None and len(epochs):
            ax.annotate(f"epoch {int(epochs[0])}", traj[0], textcoords="offset points", xytext=(4, 4), fontsize=7, color="tab:red")
        ax.set_xlim(float(surface.xcoordinates.min()), float(surface.xcoordinates.max()))  # the surface fills the axes
        ax.set_ylim(float(surface.ycoordinates.min()), float(surface.ycoordinates.max()))
        if _outside(traj, surface):
            heading += "\n(the trajectory leaves the grid: omit --x/--y to get a grid that covers it)"
        ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.12), fontsize=7, ncol=2, frameon=False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_aspect("auto")
    ax.set_title(heading, fontsize=10)
    return fig

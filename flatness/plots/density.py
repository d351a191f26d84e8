"""Hessian eigenvalue density figure from a ``flatness hessian --density`` result.

The plot of Ghorbani, Krishnan & Xiao 2019 ("An Investigation into Neural
Net Optimization via Hessian Eigenvalue Density"): the Gaussian-broadened
stochastic-Lanczos-quadrature density against the eigenvalue, on a log
scale by default so the outliers stay visible next to the bulk at zero.
Matplotlib is imported inside the function and used through its
object-oriented API on an Agg canvas (no pyplot state, no GUI backend).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from flatness.errors import FlatnessError

if TYPE_CHECKING:
    from flatness.curvature.density import DensityResult

FORMATS = (".png", ".pdf", ".svg")

# Lower limit of the log-scale axis, relative to the peak density: below it
# the broadened tails are numerical noise.
_LOG_FLOOR = 1e-8


def plot_spectral_density(result: dict[str, Any] | DensityResult, out: Path, *, log: bool = True) -> Path:
    """Draw the spectral density of a hessian result and save it to ``out``.

    Args:
        result: the JSON object written by ``flatness hessian --density``
            (needs ``density.grid`` and ``density.values``; uses
            ``top_eigenvalues``, ``trace`` and ``checkpoint`` when present),
            or a :class:`flatness.curvature.DensityResult` from the Python
            API (``spectral_density(...)``).
        out: the figure file; ``.png``, ``.pdf`` or ``.svg``.
        log: logarithmic density axis.

    Returns:
        ``out``.

    Raises:
        FlatnessError: no density in ``result``, malformed density, or an
            unsupported figure format.

    Example:
        >>> r = {"density": {"grid": [0.0, 0.5, 1.0], "values": [0.1, 1.0, 0.1]}}
        >>> plot_spectral_density(r, Path("/tmp/density.png"))  # doctest: +SKIP
    """
    from flatness.curvature.density import DensityResult

    if isinstance(result, DensityResult):
        result = {"density": result.to_dict()}
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise FlatnessError(f"figure {out} must end in .png, .pdf or .svg")
    density = result.get("density") if isinstance(result, dict) else None
    if not isinstance(density, dict):
        raise FlatnessError("this hessian result has no spectral density: run flatness hessian with --density")
    grid, values = density.get("grid"), density.get("values")
    if not isinstance(grid, list) or not isinstance(values, list) or len(grid) != len(values) or len(grid) < 2:
        raise FlatnessError("the spectral density of this hessian result is malformed: expected lists 'grid' and 'values' of equal length >= 2")
    try:
        xs = [float(v) for v in grid]
        ys = [float(v) for v in values]
    except (TypeError, ValueError):
        raise FlatnessError("the spectral density of this hessian result holds non-numeric values") from None

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    peak = max(ys) if ys else 0.0
    if log and peak > 0:
        floor = peak * _LOG_FLOOR
        ax.semilogy(xs, [max(v, floor) for v in ys], color="C0", linewidth=1.2)
        ax.set_ylim(floor, peak * 2)
    else:
        ax.plot(xs, ys, color="C0", linewidth=1.2)
        ax.set_ylim(bottom=0)
    tops = [float(v) for v in result.get("top_eigenvalues") or []]
    for i, v in enumerate(tops):
        ax.axvline(v, color="C3", linestyle=":", linewidth=0.9, label="top eigenvalues (Lanczos)" if i == 0 else None)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)" if log else "density")
    title = "Hessian eigenvalue density"
    if result.get("checkpoint"):
        title += f"\n{Path(str(result['checkpoint'])).name}"
    ax.set_title(title, fontsize=10)
    notes = []
    if tops:
        notes.append(f"lambda_max = {tops[0]:.4g}")
    if result.get("trace") is not None:
        notes.append(f"trace = {float(result['trace']):.4g}")
    if density.get("sigma") is not None:
        notes.append(f"sigma = {float(density['sigma']):.2g}")
    if notes:
        ax.text(0.02, 0.97, "\n".join(notes), transform=ax.transAxes, ha="left", va="top", fontsize=8)
    if tops:
        ax.legend(loc="lower left", fontsize=8, frameon=False)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=150)
    except OSError as e:
        raise FlatnessError(f"cannot write figure {out}: {e.strerror or e}") from None
    return out

"""Hessian eigenvalue density figure from a ``flatness hessian --density`` result.

The plot of Ghorbani, Krishnan & Xiao 2019 ("An Investigation into Neural
Net Optimization via Hessian Eigenvalue Density"): the Gaussian-broadened
stochastic-Lanczos-quadrature density against the eigenvalue, on a log
scale by default so the outliers stay visible next to the bulk at zero.
A result that also holds per-layer curvature (``--density --per-layer``)
gets both in one figure, the per-layer bars under the density.
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
    """Draw the spectral density of a hessian result (and its per-layer bars, when it has them) and save it to ``out``.

    Args:
        result: the JSON object written by ``flatness hessian --density``
            (needs ``density.grid`` and ``density.values``; uses
            ``top_eigenvalues``, ``trace``, ``samples`` and ``checkpoint`` when
            present; with ``per_layer`` too, the per-layer bars are drawn
            under the density in the same figure), or a
            :class:`flatness.curvature.DensityResult` from the Python API
            (``spectral_density(...)``).
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
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise FlatnessError(f"figure {out} must end in .png, .pdf or .svg")
    fig = spectral_density_figure(result, log=log)
    try:
        fig.savefig(out, dpi=150, bbox_inches="tight")
    except OSError as e:
        raise FlatnessError(f"cannot write figure {out}: {e.strerror or e}") from None
    return out


def spectral_density_figure(result: dict[str, Any] | DensityResult, *, log: bool = True) -> Any:
    """The ``Figure`` of :func:`plot_spectral_density` (Agg canvas, nothing written).

    Raises:
        FlatnessError: no density in ``result``, or a malformed density.
    """
    from flatness.curvature.density import DensityResult

    if isinstance(result, DensityResult):
        result = {"density": result.to_dict()}
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

    layers = result.get("per_layer") if isinstance(result, dict) else None
    if layers:  # a hessian --density --per-layer result: both, one figure
        from flatness.plots.per_layer import draw_per_layer_bars, layer_rows

        rows = layer_rows(result)
        fig = Figure(figsize=(max(7.0, 0.45 * len(rows) + 3.0), 9.0))
        FigureCanvasAgg(fig)
        ax, top_ax, trace_ax = fig.subplots(3, 1, gridspec_kw={"height_ratios": [1.3, 1, 1]})
        trace_ax.sharex(top_ax)
        draw_per_layer_bars(top_ax, trace_ax, rows, log=log)
        top_ax.tick_params(labelbottom=False)
        top_ax.set_title("Per-layer Hessian curvature (diagonal blocks)", fontsize=10)
    else:
        fig = Figure(figsize=(7.0, 4.0))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
    draw_density(ax, result, xs, ys, log=log)
    fig.tight_layout()
    return fig


def _on(result: dict[str, Any]) -> str:
    """``" on N <split> samples"`` when the result says so."""
    n, split = result.get("samples"), result.get("split")
    return f" on {n} {split + ' ' if isinstance(split, str) else ''}samples" if isinstance(n, int) else ""


def draw_density(ax: Any, result: dict[str, Any], xs: list[float], ys: list[float], *, log: bool = True) -> None:
    """The density curve, the Lanczos top eigenvalues and, to the right of the axes, a key with lambda_max, trace and sigma.

    The key sits outside the data area, so it never covers the curve;
    ``sigma`` is the standard deviation of the Gaussian that broadens each
    Ritz value into the smooth density (Ghorbani et al. 2019), in eigenvalue units.
    """
    from matplotlib.lines import Line2D

    from flatness.plots.style import legend_outside

    peak = max(ys) if ys else 0.0
    if log and peak > 0:
        floor = peak * _LOG_FLOOR
        ax.semilogy(xs, [max(v, floor) for v in ys], color="C0", linewidth=1.2)
        ax.set_ylim(floor, peak * 2)
    else:
        ax.plot(xs, ys, color="C0", linewidth=1.2)
        ax.set_ylim(bottom=0)
    tops = [float(v) for v in result.get("top_eigenvalues") or []]
    for v in tops:
        ax.axvline(v, color="C3", linestyle=":", linewidth=0.9)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)" if log else "density")
    title = f"Hessian eigenvalue density (stochastic Lanczos quadrature){_on(result)}"
    if result.get("checkpoint"):
        title += f"\n{Path(str(result['checkpoint'])).name}"
    ax.set_title(title, fontsize=10)
    density = result.get("density") or {}
    handles: list[Any] = [Line2D([], [], color="C0", lw=1.2)]
    labels = ["density"]
    if tops:
        handles.append(Line2D([], [], color="C3", ls=":", lw=0.9))
        labels.append(f"top eigenvalues (Lanczos)\n$\\lambda_{{max}}$ = {tops[0]:.4g}")
    blank = Line2D([], [], ls="none")
    if result.get("trace") is not None:
        handles.append(blank)
        labels.append(f"trace = {float(result['trace']):.4g}")
    if density.get("sigma") is not None:
        handles.append(blank)
        labels.append(f"Gaussian broadening $\\sigma$ = {float(density['sigma']):.2g}\n(width of the kernel put on\neach Ritz value, eigenvalue units)")
    legend_outside(ax, handles, labels)

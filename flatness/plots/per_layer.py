"""Bar chart of per-layer curvature: top eigenvalue and trace of each diagonal Hessian block.

Draws the ``per_layer`` list of a ``flatness hessian --per-layer`` result
(or the :class:`flatness.curvature.LayerCurvature` list of
:func:`flatness.curvature.per_layer_curvature`): two panels sharing the
layer axis, top eigenvalue above and trace below, on a symmetric-log scale
so layers of very different curvature stay readable and negative values
(saddle directions) are shown. Matplotlib is imported inside the function
and used through its object-oriented API on an Agg canvas.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flatness.errors import FlatnessError

FORMATS = (".png", ".pdf", ".svg")


def _rows(result: dict[str, Any] | Sequence[Any]) -> list[dict[str, Any]]:
    layers = result.get("per_layer") if isinstance(result, dict) else result
    if not layers:
        raise FlatnessError("this hessian result has no per-layer curvature: run flatness hessian with --per-layer")
    rows = [b.to_dict() if hasattr(b, "to_dict") else b for b in layers]
    for b in rows:
        if not isinstance(b, dict) or not {"name", "top_eigenvalue", "trace"} <= set(b):
            raise FlatnessError("the per-layer curvature of this result is malformed: expected entries with name, top_eigenvalue and trace")
    return rows


def plot_per_layer(result: dict[str, Any] | Sequence[Any], out: Path, *, log: bool = True) -> Path:
    """Draw per-layer top eigenvalues and traces as bars and save the figure to ``out``.

    Args:
        result: a hessian JSON result with ``per_layer``, or a list of
            :class:`flatness.curvature.LayerCurvature` (or their dicts).
        out: the figure file; ``.png``, ``.pdf`` or ``.svg``.
        log: symmetric-log value axes.

    Returns:
        ``out``.

    Raises:
        FlatnessError: no or malformed per-layer data, unsupported format,
            or a file that cannot be written.
    """
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise FlatnessError(f"figure {out} must end in .png, .pdf or .svg")
    rows = _rows(result)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [str(b["name"]) or "(root)" for b in rows]
    fig = Figure(figsize=(max(6.0, 0.45 * len(rows) + 2.0), 5.5))
    FigureCanvasAgg(fig)
    top_ax, trace_ax = fig.subplots(2, 1, sharex=True)
    xs = list(range(len(rows)))
    for ax, key, label, color in ((top_ax, "top_eigenvalue", "top eigenvalue", "C3"), (trace_ax, "trace", "trace", "C0")):
        values = [float(b[key]) for b in rows]
        ax.bar(xs, values, color=color)
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("symlog", linthresh=max(1e-6, 1e-3 * max(abs(v) for v in values)))
        ax.grid(axis="y", linewidth=0.4, alpha=0.5)
    trace_ax.set_xticks(xs)
    trace_ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    trace_ax.set_xlabel("parameter block")
    title = "Per-layer Hessian curvature (diagonal blocks)"
    if isinstance(result, dict) and result.get("checkpoint"):
        title += f"\n{Path(str(result['checkpoint'])).name}"
    top_ax.set_title(title, fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=150)
    except OSError as e:
        raise FlatnessError(f"cannot write figure {out}: {e.strerror or e}") from None
    return out


def per_layer_comparison_figure(results: dict[str, Sequence[Any]], *, log: bool = True) -> Any:
    """Grouped bars: per layer, one bar per checkpoint (top eigenvalue above, trace below); returns the ``Figure``.

    Args:
        results: legend label -> that checkpoint's per-layer rows (dicts or
            :class:`flatness.curvature.LayerCurvature`); every checkpoint has
            the same blocks (one architecture).
        log: symmetric-log value axes.

    Raises:
        FlatnessError: no checkpoints, or checkpoints with different blocks.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        raise FlatnessError("no per-layer curvature to draw")
    table = {label: _rows(rows) for label, rows in results.items()}
    names = [str(b["name"]) or "(root)" for b in next(iter(table.values()))]
    if any([str(b["name"]) or "(root)" for b in rows] != names for rows in table.values()):
        raise FlatnessError("the checkpoints' per-layer blocks differ; per-layer bars need one architecture")
    fig = Figure(figsize=(max(6.0, 0.35 * len(names) * len(table) + 2.5), 5.5))
    FigureCanvasAgg(fig)
    top_ax, trace_ax = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(table)
    for ax, key, label in ((top_ax, "top_eigenvalue", "top eigenvalue"), (trace_ax, "trace", "trace")):
        values = [float(b[key]) for rows in table.values() for b in rows]
        for i, (name, rows) in enumerate(table.items()):
            ax.bar([j + (i - (len(table) - 1) / 2) * width for j in range(len(names))], [float(b[key]) for b in rows], width,
                   color=f"C{i % 10}", label=name)
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("symlog", linthresh=max(1e-6, 1e-3 * max(abs(v) for v in values)))
        ax.grid(axis="y", linewidth=0.4, alpha=0.5)
    trace_ax.set_xticks(range(len(names)))
    trace_ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    trace_ax.set_xlabel("parameter block")
    top_ax.set_title("Per-layer Hessian curvature (diagonal blocks)", fontsize=10)
    top_ax.legend(fontsize=7)
    fig.tight_layout()
    return fig

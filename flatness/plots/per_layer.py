"""Bar chart of per-layer curvature: top eigenvalue and trace of each diagonal Hessian block.

Draws the ``per_layer`` list of a ``flatness hessian --per-layer`` result
(or the :class:`flatness.curvature.LayerCurvature` list of
:func:`flatness.curvature.per_layer_curvature`): two panels sharing the
layer axis, top eigenvalue above and trace below, on a log scale so layers
of very different curvature stay readable (symmetric-log when a value is
negative, a saddle direction; see :func:`set_value_scale`). A comparison
draws every checkpoint: a bar per method (mean over its seeds) and a marker
per seed. Matplotlib is imported inside the function
and used through its object-oriented API on an Agg canvas.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flatness.errors import FlatnessError

FORMATS = (".png", ".pdf", ".svg")


def layer_rows(result: dict[str, Any] | Sequence[Any]) -> list[dict[str, Any]]:
    layers = result.get("per_layer") if isinstance(result, dict) else result
    if not layers:
        raise FlatnessError("this hessian result has no per-layer curvature: run flatness hessian with --per-layer")
    rows = [b.to_dict() if hasattr(b, "to_dict") else b for b in layers]
    for b in rows:
        if not isinstance(b, dict) or not {"name", "top_eigenvalue", "trace"} <= set(b):
            raise FlatnessError("the per-layer curvature of this result is malformed: expected entries with name, top_eigenvalue and trace")
    return rows


def set_value_scale(ax: Any, values: Sequence[float], *, log: bool = True) -> None:
    """A readable value axis: log when every value is positive; symmetric-log with ticks only at 0 and whole decades otherwise.

    The symmetric-log threshold is a power of ten three decades under the
    largest magnitude; the linear region around 0 is one decade tall and the
    ticks sit only at 0 and at whole decades, so no tick label sits on top
    of the 0 label (a stray "0" over "10^-3" was the old symlog default).
    """
    import math

    from matplotlib.ticker import FixedLocator, LogFormatterSciNotation, NullLocator

    finite = [float(v) for v in values if math.isfinite(float(v))]
    if not log or not finite:
        return
    if min(finite) > 0:
        ax.set_yscale("log")
        return
    top = max(abs(v) for v in finite) or 1.0
    linthresh = 10.0 ** math.floor(math.log10(top) - 3)
    # linscale 1: the linear part (0 to linthresh) is one decade tall, so 0 and the first decade are a decade apart
    ax.set_yscale("symlog", linthresh=linthresh, linscale=1.0)
    decades = [10.0**k for k in range(int(round(math.log10(linthresh))), math.ceil(math.log10(top)) + 1)]
    low = -min(finite)
    ticks = sorted({0.0, *decades, *(-d for d in decades if d <= low * 1.0001)})
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False, linthresh=linthresh))
    ax.yaxis.set_minor_locator(NullLocator())


def draw_per_layer_bars(top_ax: Any, trace_ax: Any, rows: list[dict[str, Any]], *, log: bool = True) -> None:
    """One bar per parameter block: top eigenvalue on ``top_ax``, trace on ``trace_ax`` (block names under ``trace_ax``)."""
    names = [str(b["name"]) or "(root)" for b in rows]
    xs = list(range(len(rows)))
    for ax, key, label, color in ((top_ax, "top_eigenvalue", "top eigenvalue", "C3"), (trace_ax, "trace", "trace", "C0")):
        values = [float(b[key]) for b in rows]
        ax.bar(xs, values, color=color)
        ax.set_ylabel(f"{label}\n(block)")
        set_value_scale(ax, values, log=log)
        ax.grid(axis="y", linewidth=0.4, alpha=0.5)
    trace_ax.set_xticks(xs)
    trace_ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    trace_ax.set_xlabel("parameter block")


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
    rows = layer_rows(result)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.45 * len(rows) + 2.0), 5.5))
    FigureCanvasAgg(fig)
    top_ax, trace_ax = fig.subplots(2, 1, sharex=True)
    draw_per_layer_bars(top_ax, trace_ax, rows, log=log)
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


def per_layer_comparison_figure(results: dict[str, Sequence[Any]], *, series: dict[str, tuple[str, Any]] | None = None,
                                log: bool = True) -> Any:
    """Grouped bars per layer (top eigenvalue above, trace below); returns the ``Figure``.

    Every checkpoint is drawn. Without ``series`` each checkpoint is its own
    bar. With ``series`` (label -> ``(method, seed)``) each method gets one
    bar, the mean over its seeds, and every seed a marker on it (marker =
    seed, :mod:`flatness.plots.style`), so no seed is left out.

    Args:
        results: label -> that checkpoint's per-layer rows (dicts or
            :class:`flatness.curvature.LayerCurvature`); every checkpoint has
            the same blocks (one architecture).
        series: label -> ``(method, seed)``; default: every label its own method.
        log: log value axes (symmetric-log when a value is <= 0).

    Raises:
        FlatnessError: no checkpoints, or checkpoints with different blocks.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from flatness.plots.style import SeriesStyles, legend_outside

    if not results:
        raise FlatnessError("no per-layer curvature to draw")
    table = {label: layer_rows(rows) for label, rows in results.items()}
    names = [str(b["name"]) or "(root)" for b in next(iter(table.values()))]
    if any([str(b["name"]) or "(root)" for b in rows] != names for rows in table.values()):
        raise FlatnessError("the checkpoints' per-layer blocks differ; per-layer bars need one architecture")
    keys = {label: (series or {}).get(label, (label, 0)) for label in table}
    styles = SeriesStyles(keys.values())
    methods: dict[str, list[str]] = {}
    for label, (method, _) in keys.items():
        methods.setdefault(method, []).append(label)
    fig = Figure(figsize=(max(6.0, 0.35 * len(names) * len(methods) + 2.5), 5.5))
    FigureCanvasAgg(fig)
    top_ax, trace_ax = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(methods)
    several = any(len(labels) > 1 for labels in methods.values())
    for ax, key, label in ((top_ax, "top_eigenvalue", "top eigenvalue"), (trace_ax, "trace", "trace")):
        values = [float(b[key]) for rows in table.values() for b in rows]
        for i, (method, labels) in enumerate(methods.items()):
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(names))]
            per_seed = [[float(b[key]) for b in table[lab]] for lab in labels]
            mean = [sum(col) / len(col) for col in zip(*per_seed)]
            ax.bar(xs, mean, width, color=styles.color(method), alpha=0.45 if several else 1.0, label=method)
            if several:
                for lab, vals in zip(labels, per_seed):
                    st = styles.style(*keys[lab])
                    ax.plot(xs, vals, ls="none", marker=st.marker, color=st.color, ms=4, mfc="none", mew=1.1)
        ax.set_ylabel(label)
        set_value_scale(ax, values, log=log)
        ax.grid(axis="y", linewidth=0.4, alpha=0.5)
    trace_ax.set_xticks(range(len(names)))
    trace_ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    trace_ax.set_xlabel("parameter block")
    seeds = sorted({s for _, s in keys.values()}, key=str)
    what = (f"bars: mean over seeds ({', '.join(map(str, seeds))}), markers: each seed" if several
            else "one bar per checkpoint")
    top_ax.set_title(f"Per-layer Hessian curvature (diagonal blocks; {what})", fontsize=10)
    handles, labels = styles.legend_handles(marker_only=True)
    legend_outside(top_ax, handles, labels, fontsize=7)
    fig.tight_layout()
    return fig

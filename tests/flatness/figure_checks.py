"""Rendered-figure checks shared by the figure tests: legends off the data, tick labels apart, distinct series."""

from __future__ import annotations

from typing import Any

from matplotlib.colors import to_rgba


def drawn(fig: Any) -> Any:
    """Lay the figure out as when it is saved (the legend and tick positions are known only then)."""
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def legend_over_data(fig: Any) -> list[str]:
    """The (legend, axes) pairs where a legend's box overlaps an axes' data area (its patch)."""
    renderer = drawn(fig)
    hits = []
    legends = [a.get_legend() for a in fig.axes if a.get_legend() is not None] + list(fig.legends)
    for leg in legends:
        box = leg.get_window_extent(renderer)
        for i, ax in enumerate(fig.axes):
            if ax.get_label() == "<colorbar>" or not ax.get_visible() or not ax.axison:
                continue
            if box.overlaps(ax.get_window_extent(renderer)):
                hits.append(f"legend {[t.get_text() for t in leg.get_texts()][:3]} over axes {i} ({ax.get_title()!r})")
    return hits


def overlapping_ticks(ax: Any) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty tick labels of ``ax`` (x and y separately) whose boxes overlap."""
    renderer = drawn(ax.figure)
    pairs = []
    for axis in (ax.xaxis, ax.yaxis):
        labels = [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text().strip()]
        lo, hi = axis.get_view_interval()
        labels = [t for t in labels if min(lo, hi) - 1e-12 <= (t.get_position()[0] if axis is ax.xaxis else t.get_position()[1]) <= max(lo, hi) + 1e-12]
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                if boxes[i][1].overlaps(boxes[j][1]):
                    pairs.append((boxes[i][0], boxes[j][0]))
    return pairs


def line_styles(ax: Any) -> list[tuple[tuple[float, ...], str, str]]:
    """(colour, line style, marker) of every data line of ``ax`` (reference lines like axhline are 2-point lines at fixed x/y)."""
    out = []
    for line in ax.get_lines():
        if len(line.get_xdata()) < 2 and line.get_marker() in ("None", "", None):
            continue
        out.append((to_rgba(line.get_color()), str(line.get_linestyle()), str(line.get_marker())))
    return out

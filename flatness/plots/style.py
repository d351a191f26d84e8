"""One visual language for every figure: colour = method, line style and marker = seed; legends outside the data.

A comparison draws many series (methods x seeds): 4 methods and 3 seeds are
12 series, more than matplotlib's 10-colour cycle, so colouring by series
would give two runs the same colour. Here the colour says the method (the
10-colour ``tab10`` cycle, then ``tab20``'s lighter shades) and the line
style and marker say the seed (its rank among the seeds drawn): every
``(method, seed)`` pair gets a distinct ``(colour, linestyle, marker)`` for
any number of seeds. Legends go to the right of the axes, where they cannot
cover data (:func:`legend_outside`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
LINESTYLES: tuple[Any, ...] = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class Style:
    """How one series is drawn."""

    color: Any
    linestyle: Any
    marker: str

    def kwargs(self) -> dict[str, Any]:
        return {"color": self.color, "linestyle": self.linestyle, "marker": self.marker}


def method_color(index: int) -> Any:
    """Colour of the ``index``-th method: tab10 first, then tab20's light shades, then tab10 again."""
    if index < 10:
        return f"C{index}"
    from matplotlib import colormaps

    light = colormaps["tab20"]
    return light(2 * ((index - 10) % 10) + 1)


def seed_linestyle(rank: int) -> Any:
    """Line style of the ``rank``-th seed: solid, dashed, dotted, dash-dot, then distinct dash patterns."""
    return LINESTYLES[rank] if rank < len(LINESTYLES) else (0, (rank - 1.0, 1.5))


def seed_marker(rank: int) -> str:
    return MARKERS[rank % len(MARKERS)]


class SeriesStyles:
    """Styles for ``(method, seed)`` series: colour by method (in first-seen order), style by seed rank.

    Example:
        >>> st = SeriesStyles([("sgd", 0), ("sgd", 1), ("sam", 0)])
        >>> st.style("sam", 0).color, st.style("sgd", 1).linestyle
        ('C1', '--')
    """

    def __init__(self, series: Iterable[tuple[str, Any]]) -> None:
        self.methods: list[str] = []
        seeds: list[Any] = []
        for method, seed in series:
            if method not in self.methods:
                self.methods.append(method)
            if seed not in seeds:
                seeds.append(seed)
        self.seeds = sorted(seeds, key=lambda s: (not isinstance(s, (int, float)), s if isinstance(s, (int, float)) else str(s)))

    def color(self, method: str) -> Any:
        return method_color(self.methods.index(method))

    def style(self, method: str, seed: Any) -> Style:
        rank = self.seeds.index(seed)
        return Style(self.color(method), seed_linestyle(rank), seed_marker(rank))

    def legend_handles(self, *, drawn: Iterable[tuple[str, Any]] | None = None, marker_only: bool = False,
                       line_only: bool = False) -> tuple[list[Any], list[str]]:
        """Handles and labels: one colour entry per method, then (if several seeds) one grey entry per seed.

        ``drawn``: the ``(method, seed)`` series actually on the figure (default:
        all), so a figure that shows a subset keeps every method's colour but
        lists only what it shows. ``marker_only``: the seed entries show only
        the marker (scatter plots); ``line_only``: only the line style.
        """
        from matplotlib.lines import Line2D

        pairs = list(drawn) if drawn is not None else [(m, s) for m in self.methods for s in self.seeds]
        methods = [m for m in self.methods if any(m == pm for pm, _ in pairs)]
        seeds = [s for s in self.seeds if any(s == ps for _, ps in pairs)]
        handles: list[Any] = [Line2D([], [], color=self.color(m), lw=2.5) for m in methods]
        labels = list(methods)
        if len(seeds) > 1:
            for seed in seeds:
                rank = self.seeds.index(seed)
                ls = "none" if marker_only else seed_linestyle(rank)
                marker = "none" if line_only else seed_marker(rank)
                handles.append(Line2D([], [], color="0.35", linestyle=ls, marker=marker, ms=5, mfc="none" if marker_only else "0.35"))
                labels.append(f"seed {seed}")
        return handles, labels


def entry_series(entries: Sequence[dict[str, Any]]) -> SeriesStyles:
    """:class:`SeriesStyles` for report entries (``group`` or ``label`` is the method, ``seed`` the seed)."""
    return SeriesStyles((method_of(e), e.get("seed", 0)) for e in entries)


def method_of(entry: dict[str, Any]) -> str:
    return str(entry.get("group") or entry["label"])


def legend_outside(ax: Any, handles: list[Any] | None = None, labels: list[str] | None = None, *, title: str | None = None,
                   fontsize: float = 8) -> Any:
    """A legend to the right of ``ax`` (outside its data area); save with ``bbox_inches="tight"`` to keep it."""
    kw: dict[str, Any] = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0, "fontsize": fontsize,
                          "frameon": False}
    if title:
        kw["title"] = title
        kw["title_fontsize"] = fontsize
    if handles is not None:
        return ax.legend(handles, labels, **kw)
    return ax.legend(**kw)


def thin_ticks(ax: Any, axis: str = "x", nbins: int = 4) -> None:
    """At most ``nbins`` major ticks with compact labels (``1e-3`` style for small or large numbers) on a linear axis."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(MaxNLocator(nbins=nbins))
    fmt = ScalarFormatter(useMathText=True)
    fmt.set_powerlimits((-2, 3))
    target.set_major_formatter(fmt)

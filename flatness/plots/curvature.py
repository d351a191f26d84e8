r"""Curvature during training: :math:`\lambda_{\max}` against updates (``flatness train --track-curvature N``).

Draws one or more runs' ``curvature.jsonl`` rows (``step``, ``lambda_max``)
on a log value axis, with the stability thresholds where they apply: for
SGD with learning rate :math:`\eta` and heavy-ball momentum :math:`\beta`,
gradient descent on a quadratic is stable only while
:math:`\lambda_{\max} < 2/\eta`, and with momentum while
:math:`\lambda_{\max} < (2 + 2\beta)/\eta` (Cohen et al. 2021, "Gradient
Descent on Neural Networks Typically Occurs at the Edge of Stability").
The measuring cost (extra time over untracked training, ``extra_fraction``)
is given in the legend. ``flatness plot`` and the compare report both draw
through :func:`curvature_figure`. Matplotlib is imported inside the
functions and used through its object-oriented API on an Agg canvas.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatness.errors import FlatnessError

FORMATS = (".png", ".pdf", ".svg")


@dataclass(frozen=True)
class CurvatureTrack:
    """One run's tracked curvature.

    Attributes:
        label: legend text.
        rows: ``curvature.jsonl`` rows (each with ``step`` and ``lambda_max``).
        config: the run's config.json (``method``, ``lr``, ``momentum`` are used).
        percent: extra cost of measuring over untracked training, in %, or ``None`` if unknown.
        series: ``(method, seed)`` for the line's colour (method) and style (seed);
            default: the config's ``method`` and ``seed``.
    """

    label: str
    rows: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    percent: float | None = None
    series: tuple[str, Any] | None = None

    def method_seed(self) -> tuple[str, Any]:
        cfg = self.config or {}
        return self.series or (str(cfg.get("method") or self.label), cfg.get("seed", 0))


def thresholds(tracks: list[CurvatureTrack]) -> list[tuple[float, str, str]]:
    """``(height, linestyle, label)`` of the SGD stability lines: 2/lr, and (2+2*momentum)/lr with momentum."""
    lines: dict[float, tuple[float, str, str]] = {}
    for t in tracks:
        cfg = t.config or {}
        lr = cfg.get("lr")
        if cfg.get("method") != "sgd" or not isinstance(lr, (int, float)) or lr <= 0:
            continue
        lines.setdefault(2.0 / lr, (2.0 / lr, "--", f"2/lr = {2.0 / lr:.3g} (gradient-descent stability threshold, peak lr)"))
        beta = cfg.get("momentum")
        if isinstance(beta, (int, float)) and beta > 0:
            h = (2 + 2 * beta) / lr
            lines.setdefault(h, (h, ":", f"(2+2·{beta:g})/lr = {h:.3g} (momentum)"))
    return sorted(lines.values())


def draw_curvature_tracks(ax: Any, tracks: list[CurvatureTrack], *, log: bool = True) -> None:
    """One line per track (lambda_max against updates; colour = method, style = seed) and the stability lines, on ``ax``."""
    from flatness.plots.style import SeriesStyles, legend_outside

    styles = SeriesStyles(t.method_seed() for t in tracks)
    values: list[float] = []
    for t in tracks:
        rows = [r for r in t.rows if r.get("lambda_max") is not None]
        ys = [float(r["lambda_max"]) for r in rows]
        values += ys
        cost = f" (tracking: +{t.percent:.1f}% over untracked training)" if t.percent is not None else ""
        st = styles.style(*t.method_seed())
        ax.plot([r["step"] for r in rows], ys, color=st.color, ls=st.linestyle, marker=st.marker, ms=2.5, label=t.label + cost)
    for height, ls, label in thresholds(tracks):
        ax.axhline(height, color="k", ls=ls, lw=0.8, label=label)
    if log:
        if values and min(values) <= 0:  # a negative top eigenvalue (rare, early): keep it visible
            ax.set_yscale("symlog", linthresh=max(1e-6, 1e-3 * max(abs(v) for v in values)))
        else:
            ax.set_yscale("log")
    ax.set_xlabel("updates")
    ax.set_ylabel(r"$\lambda_{max}$ (analysis batch)")
    ax.grid(alpha=0.3, which="both")
    legend_outside(ax, fontsize=7)


def curvature_figure(tracks: list[CurvatureTrack], *, log: bool = True, title: str = "Curvature during training") -> Any:
    """A new matplotlib ``Figure`` (Agg canvas) with :func:`draw_curvature_tracks`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    draw_curvature_tracks(ax, tracks, log=log)
    ax.set_title(title, fontsize=10)
    return fig


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlatnessError(f"{path} is not a curvature.jsonl file (a line is not JSON: {e})") from None
    except OSError as e:
        raise FlatnessError(f"cannot read {path}: {e.strerror or e}") from None
    if not rows:
        raise FlatnessError(f"{path} holds no curvature rows (empty file)")
    for r in rows:
        if not isinstance(r, dict) or not isinstance(r.get("step"), int) or not isinstance(r.get("lambda_max"), (int, float)):
            raise FlatnessError(f"{path} is not a curvature.jsonl file: expected rows with 'step' and 'lambda_max' "
                                "(written by flatness train --track-curvature N)")
    return rows


def load_track(path: str | Path) -> CurvatureTrack:
    """A run's track from ``RUN/curvature.jsonl`` (or the run directory), with config.json and metrics.jsonl beside it.

    The measuring cost is the last ``extra_fraction`` in metrics.jsonl
    (measuring time over the time of everything else, cumulative); runs of
    older versions hold ``curvature_fraction`` = f (measuring over training
    including measuring), read as f / (1 - f).

    Raises:
        FlatnessError: no curvature.jsonl in the folder, an empty file, or a
            file whose rows lack ``step`` / ``lambda_max``.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "curvature.jsonl").is_file():
            raise FlatnessError(f"{path} holds no curvature.jsonl; train with --track-curvature N to record one")
        path = path / "curvature.jsonl"
    rows = _read_rows(path)
    config = _read_json(path.parent / "config.json")
    config = config if isinstance(config, dict) else {}
    percent = None
    metrics = path.parent / "metrics.jsonl"
    if metrics.is_file():
        lines = [line for line in metrics.read_text(errors="replace").splitlines() if line.strip()]
        try:
            last = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            last = {}
        if isinstance(last, dict) and isinstance(last.get("extra_fraction"), (int, float)):
            percent = 100.0 * float(last["extra_fraction"])
        elif isinstance(last, dict) and isinstance(last.get("curvature_fraction"), (int, float)) and last["curvature_fraction"] < 1:
            percent = 100.0 * float(last["curvature_fraction"]) / (1.0 - float(last["curvature_fraction"]))
    label = str(config.get("method") or path.parent.name)
    return CurvatureTrack(label, rows, config, percent)


def plot_curvature_track(path: str | Path, out: str | Path, *, log: bool = True) -> Any:
    """Draw a run's tracked lambda_max (see :func:`load_track`) and save it to ``out``; returns the ``Figure``.

    Raises:
        FlatnessError: bad input (see :func:`load_track`), an unsupported
            format, or a figure that cannot be written.
    """
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise FlatnessError(f"figure {out} must end in .png, .pdf or .svg")
    track = load_track(path)
    title = f"Curvature during training: {track.label}"
    if track.percent is not None:
        title += f"\nmeasuring cost +{track.percent:.1f}% over untracked training"
    fig = curvature_figure([track], log=log, title=title)
    try:
        fig.savefig(out, dpi=150, bbox_inches="tight")
    except OSError as e:
        raise FlatnessError(f"cannot write figure {out}: {e.strerror or e}") from None
    return fig

"""The report's figures (matplotlib, imported lazily, Agg backend).

Every figure follows :mod:`flatness.plots.style`: colour = method, line
style / marker = seed, legends outside the data area, and a title that says
what is measured and on which samples.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from flatness.plots.style import SeriesStyles, entry_series, legend_outside, method_of, thin_ticks


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path, name: str) -> Path:
    path = out / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def _groups(entries: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in entries:
        out.setdefault(e.get("group", e["label"]), []).append(e)
    return out


def _on(settings: Any) -> str:
    """What the measures are taken on, for titles: the first N samples of the split, eval mode."""
    n = getattr(settings, "samples", None)
    split = {"train": "training", "val": "validation", "test": "test"}.get(getattr(settings, "split", "train"), "analysis")
    return f"{n} {split} samples, eval mode" if n else "analysis samples, eval mode"


def _method_seed_legend(ax: Any, styles: SeriesStyles, *, drawn: list[dict] | None = None, marker_only: bool = False,
                        line_only: bool = False, extra: list | None = None) -> Any:
    """Methods (colour) then seeds (line style / marker) of the ``drawn`` entries (default: all), to the right of ``ax``."""
    pairs = [(method_of(e), e.get("seed", 0)) for e in drawn] if drawn is not None else None
    handles, labels = styles.legend_handles(drawn=pairs, marker_only=marker_only, line_only=line_only)
    for h, text in extra or []:
        handles.append(h)
        labels.append(text)
    return legend_outside(ax, handles, labels)


def _dodge(index: int, count: int, spread: float = 0.06) -> float:
    """Horizontal offset of the ``index``-th of ``count`` series, centred on 0, in units of ``spread``."""
    return (index - (count - 1) / 2) * spread


def sharpness_figure(entries: list[dict], out: Path, settings: Any = None) -> Path:
    r"""Random-perturbation sharpness against radius: log-log per method, and each method relative to the first.

    Left: the mean over seeds (line, colour = method; band = sd over seeds)
    and every seed (marker = seed), slightly shifted sideways per method so
    that no method's points hide another's. Right (two or more methods): the
    ratio of each method's mean to the first method's, where near-equal
    curves that coincide on the log-log panel separate.
    """
    plt = _plt()
    groups = _groups(entries)
    styles = entry_series(entries)
    ratio_panel = len(groups) > 1
    fig, axes = plt.subplots(1, 2 if ratio_panel else 1, figsize=(10.5 if ratio_panel else 5.5, 4), squeeze=False,
                             constrained_layout=True)
    ax = axes[0, 0]
    means: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, (g, es) in enumerate(groups.items()):
        radii = np.asarray(es[0]["sharpness"]["radii"], dtype=float)
        incs = np.asarray([e["sharpness"]["loss_increase"] for e in es], dtype=float)
        inc = incs.mean(axis=0)
        keep = (radii > 0) & (inc > 0)
        if not keep.any():
            continue
        shift = 10 ** _dodge(i, len(groups), 0.025)
        color = styles.color(g)
        means[g] = (radii[keep], inc[keep])
        ax.plot(radii[keep] * shift, inc[keep], color=color, lw=1.6, alpha=0.85, zorder=3)
        if len(es) > 1:
            sd = incs.std(axis=0, ddof=1)[keep]
            ax.fill_between(radii[keep] * shift, np.maximum(inc[keep] - sd, inc[keep] * 1e-3), inc[keep] + sd, color=color,
                            alpha=0.12, lw=0)
        for e, row in zip(es, incs):
            ok = keep & (row > 0)
            st = styles.style(g, e.get("seed", 0))
            ax.plot(radii[ok] * shift, row[ok], ls="none", marker=st.marker, color=color, ms=4, mfc="none", mew=1.0, zorder=4)
    if means:
        ax.set_xscale("log")
        ax.set_yscale("log")
        _method_seed_legend(ax if not ratio_panel else axes[0, 1], styles, marker_only=True,
                            extra=[(_line("0.35", "-"), "line: mean over seeds"), (_patch(), "band: ± sd over seeds")])
    else:
        ax.text(0.5, 0.5, "no positive loss increase at any radius > 0", transform=ax.transAxes, ha="center")
    ax.set_xlabel(r"relative radius $\sigma$ (noise std = $\sigma\,\|$filter$\|$)")
    ax.set_ylabel(r"mean loss increase $E[L(w+\epsilon)] - L(w)$")
    ax.set_title(f"Random-perturbation sharpness (log-log; radius 0 omitted)\n{_on(settings)}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if ratio_panel:
        rax = axes[0, 1]
        base = next(iter(means), None)
        if base is not None:
            br, bi = means[base]
            for g, (r, inc) in means.items():
                common = np.intersect1d(r, br)
                ratio = inc[np.isin(r, common)] / bi[np.isin(br, common)]
                rax.plot(common, ratio, color=styles.color(g), lw=1.6)  # no marker: markers mean seeds here
            rax.axhline(1.0, color="k", lw=0.8, ls="--")
            rax.set_xscale("log")
            rax.set_ylabel(f"mean loss increase / {base}'s")
            rax.set_title(f"Relative to {base} (1 = equal; same samples and noise draws)", fontsize=9)
        rax.set_xlabel(r"relative radius $\sigma$")
        rax.grid(alpha=0.3, which="both")
    return _save(fig, out, "sharpness.png")


def _line(color: Any, ls: Any) -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color, ls=ls, lw=1.6)


def _patch() -> Any:
    from matplotlib.patches import Patch

    return Patch(color="0.35", alpha=0.2)


def interpolation_figure(entries: list[dict], out: Path, settings: Any = None) -> Path | None:
    """Loss along the line from the first checkpoint to every other one that has it; None when none has."""
    have = [e for e in entries[1:] if e.get("interpolation")]
    if not have:
        return None
    plt = _plt()
    styles = entry_series(entries)  # every method keeps its colour from the other figures
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for e in have:
        it = e["interpolation"]
        st = styles.style(method_of(e), e.get("seed", 0))
        ax.plot(it["alpha"], it["loss"], color=st.color, ls=st.linestyle, marker=st.marker, ms=3, markevery=4, lw=1.4)
    ax.axvline(0.0, color="k", ls="--", lw=0.8)
    ax.axvline(1.0, color="k", ls=":", lw=0.8)
    ax.set_yscale("log")
    first = entries[0]["label"]
    ax.set_xlabel(rf"$\alpha$  ($w = (1-\alpha)\,w_0 + \alpha\,w_1$; $w_0$ = {first} (dashed), $w_1$ = each checkpoint (dotted))",
                  fontsize=8)
    ax.set_ylabel("loss (eval mode)")
    ax.set_title(f"Linear interpolation from {first} to each checkpoint\n{_on(settings)}", fontsize=9)
    fig.text(0.5, -0.04, "The minimum may sit off alpha = 0 or 1: this is the loss on an analysis subset in eval mode,\n"
             "not the training objective (augmented batches, batch statistics, weight decay, perturbations).",
             ha="center", va="top", fontsize=7, color="0.3")
    ax.grid(alpha=0.3)
    _method_seed_legend(ax, styles, drawn=have)
    return _save(fig, out, "interpolation.png")


def eigen_figure(entries: list[dict], out: Path, settings: Any = None) -> Path:
    """Top-k eigenvalues: every checkpoint as a marker (colour = method, marker = seed), a bar at each method's mean."""
    plt = _plt()
    groups = _groups(entries)
    styles = entry_series(entries)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    k = max(len(e["top_eigenvalues"]) for e in entries)
    width = 0.8 / max(len(groups), 1)
    for i, (g, es) in enumerate(groups.items()):
        centre = np.arange(k) + (i - (len(groups) - 1) / 2) * width
        vals = [e["top_eigenvalues"] for e in es]
        mean = [np.mean([v[j] for v in vals if len(v) > j]) if any(len(v) > j for v in vals) else np.nan for j in range(k)]
        ax.bar(centre, mean, width * 0.9, color=styles.color(g), alpha=0.35, label=g)
        for e in es:
            st = styles.style(g, e.get("seed", 0))
            ev = e["top_eigenvalues"]
            ax.plot(centre[: len(ev)], ev, ls="none", marker=st.marker, color=st.color, ms=5, mfc="none", mew=1.2)
    ax.set_xticks(np.arange(k), [rf"$\lambda_{j + 1}$" for j in range(k)])
    ax.set_ylabel("Hessian eigenvalue")
    ax.set_title(f"Top Hessian eigenvalues (Lanczos; bar: mean over seeds, markers: each seed)\n{_on(settings)}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    _method_seed_legend(ax, styles, marker_only=True)
    return _save(fig, out, "eigenvalues.png")


def density_figure(entries: list[dict], out: Path, settings: Any = None) -> Path | None:
    have = [e for e in entries if e.get("density")]
    if not have:
        return None
    plt = _plt()
    styles = entry_series(entries)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for e in have:
        d = e["density"]
        st = styles.style(method_of(e), e.get("seed", 0))
        ax.semilogy(d["grid"], np.maximum(np.asarray(d["values"]), 1e-12), color=st.color, ls=st.linestyle, lw=1.2)
    ax.set_ylim(bottom=1e-6)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (SLQ, Gaussian-broadened)")
    ax.set_title(f"Hessian spectral density\n{_on(settings)}", fontsize=9)
    _method_seed_legend(ax, styles, drawn=have, line_only=True)
    return _save(fig, out, "density.png")


def surface_figure(entries: list[dict], out: Path, settings: Any = None) -> Path | None:
    have = [e for e in entries if e.get("surface")]
    if not have:
        return None
    plt = _plt()
    if have[0]["surface"]["dim"] == 1:
        styles = entry_series(entries)
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for e in have:
            st = styles.style(method_of(e), e.get("seed", 0))
            ax.plot(e["surface"]["x"], e["surface"]["loss"], color=st.color, ls=st.linestyle, lw=1.4)
        ax.set_yscale("log")
        ax.set_xlabel("filter-normalized random direction")
        ax.set_ylabel("train loss (eval mode)")
        ax.set_title(f"1D loss surfaces (same direction seed)\n{_on(settings)}", fontsize=9)
        ax.grid(alpha=0.3)
        _method_seed_legend(ax, styles, drawn=have, line_only=True)
        return _save(fig, out, "surfaces.png")
    return _surface_panels(plt, have, out, settings)


def _surface_panels(plt: Any, have: list[dict], out: Path, settings: Any = None) -> Path:
    """2D surfaces, one panel each, one shared colour scale (log10 loss) and one colour bar."""
    n = len(have)
    cols = n if n <= 3 else math.ceil(math.sqrt(n))  # 4 -> 2 x 2, 5-9 -> 3 columns
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols + 1.2, 3.7 * rows + 0.4), squeeze=False, constrained_layout=True)
    logs = [np.log10(np.maximum(np.asarray(e["surface"]["loss"]), 1e-8)) for e in have]
    vmin = min(float(v.min()) for v in logs)
    vmax = max(float(v.max()) for v in logs)
    levels = np.linspace(vmin, vmax, 25)
    mappable = None
    for i, (ax, e, z) in enumerate(zip(axes.flat, have, logs)):
        sf = e["surface"]
        X, Y = np.meshgrid(sf["x"], sf["y"], indexing="ij")
        mappable = ax.contourf(X, Y, z, levels=levels, cmap="viridis")
        ax.contour(X, Y, z, levels=levels[::3], colors="white", linewidths=0.5, linestyles="solid")
        ax.plot([0], [0], marker="+", color="red", ms=8)
        ax.set_title(e["label"], fontsize=10)
        ax.set_aspect("equal")
        ax.set_xlabel(r"direction 1 ($\delta$, filter-normalized)", fontsize=8)
        if i % cols == 0:
            ax.set_ylabel(r"direction 2 ($\eta$)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"Train loss around each checkpoint (same random directions; + = the checkpoint)\n{_on(settings)}", fontsize=9)
    cbar = fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.9)
    cbar.set_label(r"$\log_{10}$ loss (shared scale)", fontsize=8)
    cbar.set_ticks(np.linspace(vmin, vmax, 6))
    cbar.ax.set_yticklabels([f"{t:.2f}" for t in np.linspace(vmin, vmax, 6)], fontsize=7)
    return _save(fig, out, "surfaces.png")


def curvature_track_figure(entries: list[dict], out: Path) -> Path | None:
    """lambda_max against updates for every run with curvature.jsonl; 2/lr where the stability threshold applies (SGD).

    Drawn by :func:`flatness.plots.curvature.curvature_figure` (as ``flatness plot RUN/curvature.jsonl``).
    """
    from flatness.plots.curvature import CurvatureTrack, curvature_figure

    have = [e for e in entries if e.get("curvature_track")]
    if not have:
        return None
    tracks = [CurvatureTrack(e["label"], e["curvature_track"], e.get("config") or {}, _measuring_percent(e),
                             series=(method_of(e), e.get("seed", 0))) for e in have]
    return _save(curvature_figure(tracks), out, "curvature_training.png")


def _measuring_percent(e: dict) -> float | None:
    """Extra cost of measuring over untracked training, in %: (tracked - untracked) / untracked (see :func:`tracking_summary`)."""
    from flatness.report.render import tracking_summary

    summary = tracking_summary(e)
    return summary["percent"] if summary else None


def per_layer_figure(entries: list[dict], out: Path, settings: Any = None) -> Path | None:
    """Per-layer top eigenvalue and trace: a bar per method (mean over its seeds), a marker per seed."""
    from flatness.plots.per_layer import per_layer_comparison_figure

    have = [e for e in entries if e.get("per_layer")]
    if not have:
        return None
    fig = per_layer_comparison_figure({e["label"]: e["per_layer"] for e in have},
                                      series={e["label"]: (method_of(e), e.get("seed", 0)) for e in have})
    fig.axes[0].set_title(f"{fig.axes[0].get_title()}\n{_on(settings)}", fontsize=9)
    return _save(fig, out, "per_layer.png")


def generalization_figure(entries: list[dict], out: Path, settings: Any = None) -> Path | None:
    """Each flatness measure against test accuracy across checkpoints, with Kendall's tau (Jiang et al. 2020)."""
    from flatness.report.stats import MEASURES, entry_values, kendall

    taus = kendall(entries)
    if not taus:
        return None
    plt = _plt()
    styles = entry_series(entries)
    fig, axes = plt.subplots(1, len(taus), figsize=(3.3 * len(taus) + 1.2, 3.4), squeeze=False, constrained_layout=True)
    vals = [entry_values(e) for e in entries]
    for ax, (key, t) in zip(axes.flat, taus.items()):
        for v, e in zip(vals, entries):
            if v[key] is None or v["test_acc"] is None:
                continue
            st = styles.style(method_of(e), e.get("seed", 0))
            ax.plot([v[key]], [v["test_acc"]], ls="none", marker=st.marker, color=st.color, ms=5, mfc="none", mew=1.3)
        ax.set_xlabel(MEASURES[key][0], fontsize=8)
        tau = f"{t['tau']:+.2f}" if t["tau"] is not None else "undefined (a constant measure)"
        ax.set_title(rf"Kendall $\tau$ = {tau} (n={t['n']})", fontsize=9)
        thin_ticks(ax, "x", nbins=4)
        ax.xaxis.get_offset_text().set_fontsize(7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("test accuracy (%, test split)", fontsize=8)
    fig.suptitle(f"Flatness measures ({_on(settings)}) against test accuracy, one marker per checkpoint", fontsize=9)
    _method_seed_legend(axes.flat[-1], styles, marker_only=True)
    return _save(fig, out, "generalization.png")


def _updates_axis(rows: list[dict]) -> tuple[list[float], bool]:
    """x values of a run's metrics rows: parameter updates (``step``) when every row has it, else data epochs."""
    if rows and all(isinstance(r.get("step"), (int, float)) for r in rows):
        return [float(r["step"]) for r in rows], True
    return [float(r["epoch"]) for r in rows], False


def _late_floor(have: list[dict]) -> float | None:
    """A test-accuracy axis floor that shows the last four fifths of every run (None when that would hide nothing)."""
    lows, overall = [], []
    for e in have:
        rows = e["training_curve"]
        xs, _ = _updates_axis(rows)
        acc = [float(r["test_acc"]) for r in rows]
        overall += acc
        late = [a for x, a in zip(xs, acc) if x >= 0.2 * max(xs)]
        lows += late or acc
    if not lows:
        return None
    floor = math.floor(min(lows) - 0.1 * (max(overall) - min(lows)) - 1)
    return float(floor) if floor > min(overall) + 5 else None


def training_figure(entries: list[dict], out: Path, settings: Any = None) -> Path | None:
    """Train loss and test accuracy against parameter updates (runs are matched on updates, not data epochs)."""
    have = [e for e in entries if e.get("training_curve")]
    if not have:
        return None
    plt = _plt()
    styles = entry_series(entries)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    on_updates = True
    for e in have:
        rows = e["training_curve"]
        xs, ok = _updates_axis(rows)
        on_updates &= ok
        st = styles.style(method_of(e), e.get("seed", 0))
        kw = {"color": st.color, "ls": st.linestyle, "lw": 1.2}
        a1.plot(xs, [r["train_loss"] for r in rows], **kw)
        a2.plot(xs, [r["test_acc"] for r in rows], **kw)
    a1.set_yscale("log")
    xlabel = "parameter updates (runs are matched on updates)" if on_updates else "data epoch"
    a1.set_ylabel("train loss")
    a1.set_title("Train loss (training mode, mean over each data epoch's batches)", fontsize=9)
    a2.set_ylabel("test accuracy (%)")
    bottom = _late_floor(have)
    a2.set_title("Test accuracy (test split, eval mode, after each data epoch)"
                 + (f"\ny axis from {bottom:.0f}%: the first fifth of training lies below" if bottom is not None else ""), fontsize=9)
    if bottom is not None:
        a2.set_ylim(bottom=bottom)
    for a in (a1, a2):
        a.set_xlabel(xlabel)
        a.grid(alpha=0.3)
    _method_seed_legend(a2, styles, drawn=have, line_only=True)
    return _save(fig, out, "training.png")


def make_figures(entries: list[dict], settings: Any, out: Path) -> dict[str, Path]:
    """Draw every figure the entries allow; returns name -> file."""
    figs: dict[str, Path | None] = {
        "Sharpness": sharpness_figure(entries, out, settings),
        "Top eigenvalues": eigen_figure(entries, out, settings),
        "Loss surfaces": surface_figure(entries, out, settings),
        "Interpolation": interpolation_figure(entries, out, settings) if len(entries) > 1 else None,
        "Spectral density": density_figure(entries, out, settings),
        "Per-layer curvature": per_layer_figure(entries, out, settings),
        "Training curves": training_figure(entries, out, settings),
        "Curvature during training": curvature_track_figure(entries, out),
        "Flatness vs test accuracy": generalization_figure(entries, out, settings) if len(entries) >= 3 else None,
    }
    return {k: v for k, v in figs.items() if v is not None}

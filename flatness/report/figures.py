"""The report's figures (matplotlib, imported lazily, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


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


def sharpness_figure(entries: list[dict], out: Path) -> Path:
    """Mean loss increase against radius, log-log so every radius is readable (one line per method, mean over seeds)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    plotted = 0
    for g, es in _groups(entries).items():
        radii = np.asarray(es[0]["sharpness"]["radii"], dtype=float)
        inc = np.mean([e["sharpness"]["loss_increase"] for e in es], axis=0)
        keep = (radii > 0) & (inc > 0)
        if not keep.any():
            continue
        plotted += 1
        spread = np.std([e["sharpness"]["loss_increase"] for e in es], axis=0, ddof=1) if len(es) > 1 else None
        yerr = spread[keep] if spread is not None else np.asarray(es[0]["sharpness"]["stderr"])[keep]
        ax.errorbar(radii[keep], inc[keep], yerr=np.minimum(yerr, inc[keep] * 0.999), marker="o", ms=3, capsize=2,
                    label=f"{g} (n={len(es)})" if len(es) > 1 else g)
    if plotted:
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no positive loss increase at any radius > 0", transform=ax.transAxes, ha="center")
    ax.set_xlabel(r"relative radius $\sigma$ (noise std = $\sigma\,\|$filter$\|$)")
    ax.set_ylabel(r"mean loss increase $E[L(w+\epsilon)] - L(w)$")
    ax.set_title("Random-perturbation sharpness (log-log; radius 0 omitted)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if plotted:
        ax.legend(fontsize=8)
    return _save(fig, out, "sharpness.png")


def interpolation_figure(entries: list[dict], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for e in entries[1:]:
        it = e.get("interpolation")
        if not it:
            continue
        ax.plot(it["alpha"], it["loss"], label=f"{entries[0]['label']} -> {e['label']}")
    ax.axvline(0.0, color="k", ls="--", lw=0.8)
    ax.axvline(1.0, color="k", ls=":", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel(r"$\alpha$  ($w = (1-\alpha) w_0 + \alpha w_1$; dashed: $\alpha=0$, dotted: $\alpha=1$)")
    ax.set_ylabel("loss on the analysis samples (eval mode)")
    ax.set_title("Linear interpolation from the first checkpoint", fontsize=10)
    fig.text(0.5, -0.04, "The minimum may sit off alpha = 0 or 1: this is the loss on an analysis subset in eval mode,\n"
             "not the training objective (augmented batches, batch statistics, weight decay, perturbations).",
             ha="center", va="top", fontsize=7, color="0.3")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, out, "interpolation.png")


def eigen_figure(entries: list[dict], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    k = max(len(e["top_eigenvalues"]) for e in entries)
    width = 0.8 / len(entries)
    for i, e in enumerate(entries):
        ev = e["top_eigenvalues"]
        ax.bar(np.arange(len(ev)) + i * width, ev, width, label=e["label"])
    ax.set_xticks(np.arange(k) + 0.4 - width / 2, [rf"$\lambda_{j + 1}$" for j in range(k)])
    ax.set_ylabel("Hessian eigenvalue")
    ax.set_title("Top Hessian eigenvalues (Lanczos)")
    ax.legend()
    return _save(fig, out, "eigenvalues.png")


def density_figure(entries: list[dict], out: Path) -> Path | None:
    have = [e for e in entries if e.get("density")]
    if not have:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for e in have:
        d = e["density"]
        ax.semilogy(d["grid"], np.maximum(np.asarray(d["values"]), 1e-12), label=e["label"])
    ax.set_ylim(bottom=1e-6)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (SLQ)")
    ax.set_title("Hessian spectral density")
    ax.legend()
    return _save(fig, out, "density.png")


def surface_figure(entries: list[dict], out: Path) -> Path | None:
    have = [e for e in entries if e.get("surface")]
    if not have:
        return None
    plt = _plt()
    if have[0]["surface"]["dim"] == 1:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for e in have:
            sf = e["surface"]
            ax.plot(sf["x"], sf["loss"], label=e["label"])
        ax.set_yscale("log")
        ax.set_xlabel("filter-normalized random direction")
        ax.set_ylabel("train loss")
        ax.set_title("1D loss surfaces (same direction seed)")
        ax.grid(alpha=0.3)
        ax.legend()
        return _save(fig, out, "surfaces.png")
    return _surface_panels(plt, have, out)


def _surface_panels(plt: Any, have: list[dict], out: Path) -> Path:
    """2D surfaces, one panel each, one shared colour scale (log10 loss) and one colour bar."""
    n = len(have)
    cols = n if n <= 3 else math.ceil(math.sqrt(n))  # 4 -> 2 x 2, 5-9 -> 3 columns
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols + 1.2, 3.7 * rows), squeeze=False, constrained_layout=True)
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
    tracks = [CurvatureTrack(e["label"], e["curvature_track"], e.get("config") or {}, _measuring_percent(e)) for e in have]
    return _save(curvature_figure(tracks), out, "curvature_training.png")


def _measuring_percent(e: dict) -> float | None:
    """% of training time spent measuring: the run's last ``curvature_fraction``, else curvature_seconds / train_seconds."""
    from flatness.report.render import tracking_summary

    last = (e.get("training_curve") or [{}])[-1]
    if isinstance(last, dict) and isinstance(last.get("curvature_fraction"), (int, float)):
        return 100.0 * float(last["curvature_fraction"])
    summary = tracking_summary(e)
    return summary["percent"] if summary else None


def per_layer_figure(entries: list[dict], out: Path) -> Path | None:
    """Per-layer top eigenvalue and trace as grouped bars, one colour per method (its first checkpoint)."""
    from flatness.plots.per_layer import per_layer_comparison_figure

    have = [es[0] for es in _groups([e for e in entries if e.get("per_layer")]).values()]
    if not have:
        return None
    return _save(per_layer_comparison_figure({e["label"]: e["per_layer"] for e in have}), out, "per_layer.png")


def generalization_figure(entries: list[dict], out: Path) -> Path | None:
    """Each flatness measure against test accuracy across checkpoints, with Kendall's tau (Jiang et al. 2020)."""
    from flatness.report.stats import MEASURES, entry_values, kendall

    taus = kendall(entries)
    if not taus:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(taus), figsize=(3.3 * len(taus), 3.2), squeeze=False, constrained_layout=True)
    vals = [entry_values(e) for e in entries]
    for ax, (key, t) in zip(axes.flat, taus.items()):
        for g in dict.fromkeys(e.get("group", e["label"]) for e in entries):
            pts = [(v[key], v["test_acc"]) for v, e in zip(vals, entries) if e.get("group", e["label"]) == g
                   and v[key] is not None and v["test_acc"] is not None]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, label=g)
        ax.set_xlabel(MEASURES[key][0], fontsize=8)
        ax.set_title(rf"Kendall $\tau$ = {t['tau']:+.2f} (n={t['n']})", fontsize=9)
        ax.tick_params(labelsize=7)
    axes.flat[0].set_ylabel("test accuracy (%)", fontsize=8)
    axes.flat[0].legend(fontsize=6)
    return _save(fig, out, "generalization.png")


def training_figure(entries: list[dict], out: Path) -> Path | None:
    have = [e for e in entries if e.get("training_curve")]
    if not have:
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for e in have:
        rows = e["training_curve"]
        ep = [r["epoch"] for r in rows]
        a1.plot(ep, [r["train_loss"] for r in rows], label=e["label"])
        a2.plot(ep, [r["test_acc"] for r in rows], label=e["label"])
    a1.set_yscale("log")
    a1.set_xlabel("epoch")
    a1.set_ylabel("train loss")
    a2.set_xlabel("epoch")
    a2.set_ylabel("test accuracy (%)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    return _save(fig, out, "training.png")


def make_figures(entries: list[dict], settings: Any, out: Path) -> dict[str, Path]:
    """Draw every figure the entries allow; returns name -> file."""
    figs: dict[str, Path | None] = {
        "Sharpness": sharpness_figure(entries, out),
        "Top eigenvalues": eigen_figure(entries, out),
        "Loss surfaces": surface_figure(entries, out),
        "Interpolation": interpolation_figure(entries, out) if len(entries) > 1 else None,
        "Spectral density": density_figure(entries, out),
        "Per-layer curvature": per_layer_figure(entries, out),
        "Training curves": training_figure(entries, out),
        "Curvature during training": curvature_track_figure(entries, out),
        "Flatness vs test accuracy": generalization_figure(entries, out) if len(entries) >= 3 else None,
    }
    return {k: v for k, v in figs.items() if v is not None}

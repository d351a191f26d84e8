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


def sharpness_figure(entries: list[dict], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for e in entries:
        sh = e["sharpness"]
        ax.errorbar(sh["radii"], sh["loss_increase"], yerr=sh.get("stderr"), marker="o", ms=3, capsize=2, label=e["label"])
    ax.set_xlabel(r"relative radius $\sigma$ (filter-wise Gaussian noise)")
    ax.set_ylabel(r"mean loss increase $E[L(w+\epsilon)] - L(w)$")
    ax.set_title("Random-perturbation sharpness")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out, "sharpness.png")


def interpolation_figure(entries: list[dict], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for e in entries[1:]:
        it = e["interpolation"]
        ax.plot(it["alpha"], it["loss"], label=f"{entries[0]['label']} -> {e['label']}")
    ax.set_yscale("log")
    ax.set_xlabel(r"$\alpha$  ($w = (1-\alpha) w_0 + \alpha w_1$)")
    ax.set_ylabel("train loss")
    ax.set_title("Linear interpolation from the first checkpoint")
    ax.grid(alpha=0.3)
    ax.legend()
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
    n = len(have)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    logs = [np.log10(np.maximum(np.asarray(e["surface"]["loss"]), 1e-8)) for e in have]
    vmin = min(float(v.min()) for v in logs)
    vmax = max(float(v.max()) for v in logs)
    levels = np.linspace(vmin, vmax, 25)
    mappable = None
    for ax, e, z in zip(axes.flat, have, logs):
        sf = e["surface"]
        X, Y = np.meshgrid(sf["x"], sf["y"], indexing="ij")
        mappable = ax.contourf(X, Y, z, levels=levels, cmap="viridis")
        ax.contour(X, Y, z, levels=levels[::3], colors="white", linewidths=0.5)
        ax.set_title(e["label"])
        ax.set_aspect("equal")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(mappable, ax=axes.ravel().tolist(), label=r"$\log_{10}$ train loss (shared scale)")
    return _save(fig, out, "surfaces.png")


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
        "Training curves": training_figure(entries, out),
    }
    return {k: v for k, v in figs.items() if v is not None}

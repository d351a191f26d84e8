"""The report's and ``flatness plot``'s figures, checked on the rendered figure.

Colour by method and line style / marker by seed (12 series on a 10-colour
cycle gave two runs one colour), legends outside the data area, updates on
the x axis where runs are matched on updates, tick labels apart, every seed
of a per-layer comparison drawn, density and per-layer results in one figure.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flatness.report import figures as report_figures
from flatness.report.compare import CompareSettings
from tests.flatness.figure_checks import legend_over_data, line_styles, overlapping_ticks

METHODS = ("sgd", "sgd-2x", "sam", "m-arwp")
SEEDS = (0, 1, 2)
LAYERS = ("features.0.weight", "features.0.bias", "linear.weight", "linear.bias")


def _entry(method: str, seed: int, k: int) -> dict[str, Any]:
    rng = np.random.default_rng(100 * k + seed)
    epochs = 120 if method == "m-arwp" else 60  # the alternate scheme: two data epochs per epoch of updates
    per_epoch = 16 if method == "m-arwp" else 32
    updates = 2 if method == "sgd-2x" else 1
    curve = [{"epoch": e, "step": e * per_epoch * updates, "train_loss": 2.3 * math.exp(-e / 15) + 0.01,
              "test_acc": 95 - 80 * math.exp(-e / 8) + rng.normal(0, 0.3), "seconds": 0.1} for e in range(1, epochs + 1)]
    radii = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2]
    return {
        "label": f"{method} s{seed}", "group": method, "seed": seed, "method": method.replace("-2x", ""),
        "config": {"method": method.replace("-2x", ""), "seed": seed, "lr": 0.1}, "cost": {},
        "training_curve": curve,
        "train_loss": 0.012 + 0.001 * rng.random(), "test_loss": 0.18, "test_acc": 94 + rng.random(),
        "top_eigenvalues": sorted(rng.uniform(1.5, 3.5, 3), reverse=True), "trace": 20 + 8 * rng.random(),
        "adversarial_sharpness": 0.0019 + 0.0019 * (3 * k + seed) / 11,  # the demo's range: its default tick labels overlapped
        "sharpness": {"radii": radii, "loss_increase": [0.0] + [2000 * r**2 * (1 + 0.05 * k) * (1 + 0.1 * rng.random()) for r in radii[1:]],
                      "stderr": [0.0] * 6},
        "per_layer": [{"name": n, "top_eigenvalue": float(rng.uniform(0.1, 1.0)) if "bias" not in n else -0.002 * (seed + 1),
                       "trace": float(rng.uniform(0.5, 5.0))} for n in LAYERS],
        "density": {"grid": np.linspace(-0.5, 4, 50).tolist(), "values": np.exp(-np.linspace(-0.5, 4, 50) ** 2).tolist(), "sigma": 0.07},
        "interpolation": {"alpha": np.linspace(-0.25, 1.25, 13).tolist(), "loss": (0.02 + np.sin(np.linspace(0, 3, 13)) ** 2 * (0.01 + k / 100)).tolist()}
        if seed == 0 else None,
    }


def _entries(methods: tuple[str, ...] = METHODS, seeds: tuple[int, ...] = SEEDS) -> list[dict[str, Any]]:
    return [_entry(m, s, k) for k, m in enumerate(methods) for s in seeds]


@pytest.fixture
def drawn_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """name -> Figure of every figure the report saves (captured before it is closed)."""
    figs: dict[str, Any] = {}
    save = report_figures._save

    def keep(fig: Any, out: Path, name: str) -> Path:
        figs[name] = fig
        fig.savefig(out / name, dpi=60, bbox_inches="tight")
        return out / name

    monkeypatch.setattr(report_figures, "_save", keep)
    yield figs
    monkeypatch.setattr(report_figures, "_save", save)
    for fig in figs.values():
        report_figures._plt().close(fig)


def test_twelve_series_get_distinct_styles_colour_by_method_and_updates_on_x(drawn_figures: dict, tmp_path: Path) -> None:
    entries = _entries()
    report_figures.make_figures(entries, CompareSettings(samples=1000), tmp_path)
    loss_ax, acc_ax = drawn_figures["training.png"].axes
    styles = line_styles(loss_ax)
    assert len(styles) == 12 and len(set((c, ls) for c, ls, _ in styles)) == 12  # sgd s0 and m-arwp s1 no longer share a look
    by_method = {m: {styles[i][0] for i, e in enumerate(entries) if e["group"] == m} for m in METHODS}
    assert all(len(c) == 1 for c in by_method.values()) and len({next(iter(c)) for c in by_method.values()}) == 4
    by_seed = {s: {styles[i][1] for i, e in enumerate(entries) if e["seed"] == s} for s in SEEDS}
    assert all(len(v) == 1 for v in by_seed.values()) and len({next(iter(v)) for v in by_seed.values()}) == 3
    for ax in (loss_ax, acc_ax):
        assert "updates" in ax.get_xlabel()
    # m-arwp read 120 data epochs for the 1920 updates sgd made in 60: both end at update 1920
    ends = {e["label"]: line.get_xdata()[-1] for e, line in zip(entries, loss_ax.get_lines())}
    assert ends["m-arwp s0"] == ends["sgd s0"] == 1920 and ends["sgd-2x s0"] == 3840
    for name in ("generalization.png", "eigenvalues.png", "sharpness.png"):
        marks = line_styles(drawn_figures[name].axes[0])
        seeded = [(c, m) for c, _, m in marks if m not in ("None", "")]
        assert len(set(seeded)) == 12, name  # one (colour, marker) per checkpoint


def test_legends_sit_outside_the_data(drawn_figures: dict, tmp_path: Path) -> None:
    report_figures.make_figures(_entries(), CompareSettings(samples=1000), tmp_path)
    assert {"training.png", "sharpness.png", "eigenvalues.png", "interpolation.png", "density.png", "per_layer.png",
            "generalization.png", "surfaces.png"} - {"surfaces.png"} <= set(drawn_figures)
    for name, fig in drawn_figures.items():
        assert any(a.get_legend() is not None for a in fig.axes), name
        assert legend_over_data(fig) == [], name


def test_panels_have_readable_ticks_and_say_what_and_on_which_samples(drawn_figures: dict, tmp_path: Path) -> None:
    report_figures.make_figures(_entries(), CompareSettings(samples=777), tmp_path)
    gen = drawn_figures["generalization.png"]
    for ax in gen.axes:
        if ax.get_legend() is None or ax.get_xlabel():
            assert overlapping_ticks(ax) == [], ax.get_xlabel()
    assert "777 training samples" in gen._suptitle.get_text()
    for name in ("sharpness.png", "eigenvalues.png", "interpolation.png", "density.png", "per_layer.png"):
        assert "777 training samples" in drawn_figures[name].axes[0].get_title(), name


def test_per_layer_comparison_draws_every_seed(drawn_figures: dict, tmp_path: Path) -> None:
    entries = _entries()
    report_figures.make_figures(entries, CompareSettings(samples=100), tmp_path)
    top, trace = drawn_figures["per_layer.png"].axes
    assert "mean over seeds (0, 1, 2)" in top.get_title()
    for ax, key in ((top, "top_eigenvalue"), (trace, "trace")):
        marks = [line for line in ax.get_lines() if line.get_marker() not in ("None", "")]
        assert len(marks) == 12  # every checkpoint, not only each method's first seed
        drawn = sorted(round(float(v), 9) for line in marks for v in line.get_ydata())
        assert drawn == sorted(round(b[key], 9) for e in entries for b in e["per_layer"])
        bars = {c.get_label(): [p.get_height() for p in c] for c in ax.containers}
        sgd = [e for e in entries if e["group"] == "sgd"]
        assert bars["sgd"] == pytest.approx([np.mean([e["per_layer"][j][key] for e in sgd]) for j in range(len(LAYERS))])
        assert overlapping_ticks(ax) == []


def test_per_layer_log_axis_has_no_stray_zero_tick(tmp_path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from flatness.plots.per_layer import set_value_scale

    for values in ([0.9, 0.2, 0.01, -0.002], [3.0, 1e-3, 0.0], [5.0, 0.5, 0.05]):
        fig = Figure(figsize=(4, 2.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.bar(range(len(values)), values)
        set_value_scale(ax, values)
        assert overlapping_ticks(ax) == [], values


def test_one_method_demo_writes_no_empty_interpolation(tmp_path: Path) -> None:
    entries = _entries(("sgd",), (0, 1))  # surfaces and interpolation only for each method's first seed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "No artists with labels found to put in legend" was the old symptom
        figs = report_figures.make_figures(entries, CompareSettings(samples=100), tmp_path)
    assert "Interpolation" not in figs and not (tmp_path / "interpolation.png").exists()


def test_sharpness_methods_stay_apart(drawn_figures: dict, tmp_path: Path) -> None:
    entries = _entries()
    for e in entries:  # identical curves for every method: the old figure showed only the last one
        e["sharpness"] = dict(entries[0]["sharpness"])
    report_figures.make_figures(entries, CompareSettings(samples=100), tmp_path)
    ax, ratio = drawn_figures["sharpness.png"].axes[:2]
    means = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    assert len(means) == 4 and len({tuple(np.round(line.get_xdata(), 9)) for line in means}) == 4  # shifted sideways
    assert "Relative to sgd" in ratio.get_title()


def test_paired_table_names_the_better_side_and_has_every_measure_report_json_has() -> None:
    from flatness.report.render import paired_rows
    from flatness.report.stats import MEASURES, group_stats

    entries = []
    for g, lam, acc in (("sgd", 3.0, 94.0), ("m-arwp", 2.0, 94.1)):
        for s in (0, 1, 2):
            entries.append({"label": f"{g} s{s}", "group": g, "seed": s, "top_eigenvalues": [lam + 0.01 * s], "test_acc": acc + [0.5, -0.4, 0.1][s] * (1 if g == "sgd" else -1),
                            "test_loss": 0.2, "train_loss": 0.01 + (0.002 if g == "sgd" else 0.0) + 0.0001 * s, "trace": 20.0 + s,
                            "adversarial_sharpness": 0.003 - (0.001 if g == "m-arwp" else 0) + 1e-5 * s,
                            "sharpness": {"loss_increase": [0.0, 1.0 + s]}})
    stats = group_stats(entries)
    head, rows = paired_rows(stats)
    measures = {r[2] for r in rows}
    assert {MEASURES["train_loss"][0], MEASURES["adversarial_sharpness"][0]} <= measures
    assert measures == {title for k, (title, _) in MEASURES.items() if stats["m-arwp"]["paired"]["sgd"][k] is not None}
    verdict = {r[2]: r[-1] for r in rows}
    assert verdict["lambda_max"] == "m-arwp lower than sgd (better): interval excludes 0"
    assert verdict["train loss"] == "m-arwp lower than sgd (better): interval excludes 0"
    assert verdict["test accuracy (%)"] == "within noise: interval contains 0"


def test_worse_side_is_named_too() -> None:
    from flatness.report.render import paired_verdict

    p = {"mean": 0.5, "within_noise": False}
    assert paired_verdict("sam", "sgd", p, higher_is_better=False) == "sam higher than sgd (worse): interval excludes 0"
    assert paired_verdict("sam", "sgd", {**p, "mean": -0.5}, higher_is_better=True) == "sam lower than sgd (worse): interval excludes 0"


def test_one_method_conclusion_gives_the_reason_and_seed_count() -> None:
    from flatness.report.stats import conclusion, group_stats

    one = [{"label": f"sgd s{s}", "group": "sgd", "seed": s, "top_eigenvalues": [3.0], "test_acc": 94.0} for s in (0, 1)]
    (line,) = conclusion(group_stats(one))
    assert "One method only (sgd 2 seeds)" in line and "Fewer than two" not in line
    unpaired = one[:1] + [{**one[1], "group": "sam", "label": "sam s1"}]
    (line,) = conclusion(group_stats(unpaired))
    assert "sgd 1 seed, sam 1 seed" in line and "same seeds" in line


def test_density_and_per_layer_result_draws_both(tmp_path: Path) -> None:
    from flatness.plots.density import spectral_density_figure
    from tests.conftest import run_cli

    result = {"top_eigenvalues": [3.0, 1.0], "trace": 12.0, "samples": 64, "split": "train",
              "density": {"grid": np.linspace(-1, 4, 40).tolist(), "values": np.exp(-np.linspace(-1, 4, 40) ** 2).tolist(), "sigma": 0.076},
              "per_layer": [{"name": n, "top_eigenvalue": v, "trace": 2 * v} for n, v in (("a.weight", 2.0), ("a.bias", 0.01), ("b.weight", -0.002))]}
    fig = spectral_density_figure(result)
    dens, top, trace = fig.axes
    assert [len(ax.patches) for ax in (top, trace)] == [3, 3]
    assert [p.get_height() for p in top.patches] == [2.0, 0.01, -0.002]
    key = " ".join(t.get_text() for t in dens.get_legend().get_texts())
    assert "Gaussian broadening" in key and "0.076" in key  # sigma says what it is
    assert legend_over_data(fig) == []
    for ax in (top, trace):
        assert overlapping_ticks(ax) == []
    src = tmp_path / "h.json"
    src.write_text(__import__("json").dumps(result))
    done = run_cli("plot", str(src), "--out", str(tmp_path / "both.png"))
    assert done.returncode == 0 and "wrote" in done.stdout, done.stderr
    only = {k: v for k, v in result.items() if k != "per_layer"}
    assert len(spectral_density_figure(only).axes) == 1


def test_hessian_axes_say_filter_normalized_when_saved_so(tmp_path: Path) -> None:
    from flatness.landscape.storage import Surface
    from flatness.plots.surface import surface_figure

    xs = np.linspace(-1, 1, 5)
    d = [[np.full((2, 3), 2.0)], [np.full((2, 3), 1.0)]]
    base = {"directions": "hessian", "hessian_eigenvalues": [4.42, 1.5], "samples": 100, "split": "train"}
    z = np.add.outer(xs**2, xs**2)
    unit = Surface(xcoordinates=xs, ycoordinates=xs, values={"train_loss": z}, directions=d, settings=base)
    assert surface_figure(unit).axes[0].get_xlabel() == "Hessian eigenvector 1 (unit, λ1 = 4.42)"
    filt = Surface(xcoordinates=xs, ycoordinates=xs, values={"train_loss": z}, directions=d, settings={**base, "hessian_normalize": "filter"})
    ax = surface_figure(filt).axes[0]
    assert ax.get_xlabel().startswith("Hessian eigenvector 1, filter-normalized") and "norm 4.9" in ax.get_xlabel()
    assert "λ1 = 4.42 of the unit vector" in ax.get_xlabel() and "filter-normalized" in ax.get_title()
    assert "100 train samples" in ax.get_title()


@pytest.mark.parametrize("kind", ["contour", "filled", "heatmap"])
def test_surface_plot_legends_stay_off_the_surface(kind: str) -> None:
    from flatness.landscape.storage import Surface
    from flatness.plots.surface import surface_figure

    xs, ys = np.linspace(-3, 1, 9), np.linspace(-1, 2, 7)
    z = np.add.outer(ys**2, xs**2) + 0.1
    path = np.array([[-2.5, 1.5], [-1.0, 0.8], [0.0, 0.0]])
    s = Surface(xcoordinates=xs, ycoordinates=ys, values={"train_loss": z}, settings={"directions": "pca", "samples": 50},
                extra={"proj_xcoord": path[:, 0], "proj_ycoord": path[:, 1], "proj_epochs": np.array([1, 2, 3])})
    fig = surface_figure(s, kind=kind, trajectory=True)
    assert legend_over_data(fig) == []
    assert fig.axes[0].get_xlim() == (-3.0, 1.0) and "leaves the grid" not in fig.axes[0].get_title()


def test_curvature_tracks_colour_by_method_and_keep_the_legend_outside() -> None:
    from flatness.plots.curvature import CurvatureTrack, curvature_figure

    tracks = [CurvatureTrack(f"{m} s{s}", [{"step": 10 * k, "lambda_max": 2.0 + k + s} for k in range(1, 6)],
                             {"method": "sgd", "lr": 0.1, "seed": s}, series=(m, s)) for m in ("sgd", "sgd-2x") for s in (0, 1)]
    fig = curvature_figure(tracks)
    styles = line_styles(fig.axes[0])[:4]
    assert len({(c, ls) for c, ls, _ in styles}) == 4 and len({c for c, _, _ in styles}) == 2
    assert legend_over_data(fig) == []

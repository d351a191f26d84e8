"""Comparison reports: keys, self-contained HTML, cache reuse."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flatness.errors import FlatnessError
from flatness.report import CompareSettings, compare

KEYS = {"path", "method", "config", "train_loss", "train_acc", "test_loss", "test_acc", "top_eigenvalues", "trace", "sharpness", "adversarial_sharpness"}


def _settings(**kw) -> CompareSettings:
    base = dict(samples=64, batch_size=64, surface="1d", surface_points=5, top_k=2, tol=1e-3, trace_matvecs=9, radii=(0.0, 0.05), draws=2, interp_points=5)
    return CompareSettings(**{**base, **kw})


def test_report_files_keys_and_cache(make_checkpoint, tmp_path: Path) -> None:
    a, b, c = (make_checkpoint("mlp", seed=s, hidden=8) for s in (0, 1, 2))
    out = tmp_path / "rep"
    r1 = compare([a, b], out, _settings())
    assert sorted(r1.computed) == ["core", "core", "interp", "interp", "surface", "surface"]
    data = json.loads((out / "report.json").read_text())
    assert [Path(e["path"]) for e in data["checkpoints"]] == [a, b]
    for e in data["checkpoints"]:
        assert KEYS <= set(e)
        assert set(e["sharpness"]) >= {"radii", "loss_increase"} and len(e["top_eigenvalues"]) == 2
        assert e["top_eigenvalues"][0] >= e["top_eigenvalues"][1]
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) >= 3 and all(len(i) > 1000 for i in imgs)
    summary = page[page.index('id="summary"'):]
    assert "<table" in page and summary[: summary.index("</table>")].count("<tr>") == 1 + 2
    md = (out / "report.md").read_text()
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / name).exists()
    with pytest.raises(FlatnessError, match="--force"):
        compare([a, b], out, _settings())
    r2 = compare([a, b, c], out, _settings(), force=True)
    assert sorted(r2.computed) == ["core", "interp", "surface"]  # only the new checkpoint
    assert sorted(r2.reused) == ["core", "core", "interp", "interp", "surface", "surface"]
    assert json.loads((out / "report.json").read_text())["checkpoints"][0]["top_eigenvalues"] == data["checkpoints"][0]["top_eigenvalues"]


def test_mixed_datasets_refused(make_checkpoint, tmp_path: Path) -> None:
    a = make_checkpoint("mlp", data="synthetic", seed=0)
    b = make_checkpoint("mlp", data="mnist1d", seed=1)
    with pytest.raises(FlatnessError, match="different datasets"):
        compare([a, b], tmp_path / "rep", _settings())


def test_bad_settings(make_checkpoint, tmp_path: Path) -> None:
    with pytest.raises(FlatnessError, match="--surface"):
        compare([make_checkpoint("mlp")], tmp_path / "rep", _settings(surface="3d"))


def test_interpolation_endpoints_match_each_checkpoint(make_checkpoint, tmp_path: Path) -> None:
    from flatness.analysis import prepare_analysis
    from flatness.report.compare import _interpolation
    from flatness.training.loop import evaluate

    a, b = make_checkpoint("mlp", seed=0, hidden=8), make_checkpoint("mlp", seed=1, hidden=8)
    s = _settings(interp_points=7)  # alphas -0.25, 0, 0.25, ..., 1.25
    fa, fb = prepare_analysis(a, samples=64, batch_size=64), prepare_analysis(b, samples=64, batch_size=64)
    x, y = fa.batches[0]
    before = {k: v.clone() for k, v in fb.model.state_dict().items()}
    it = _interpolation(fa, fb, s)
    assert abs(it["alpha"][1]) < 1e-9 and abs(it["alpha"][5] - 1) < 1e-9
    assert abs(it["loss"][1] - evaluate(fa.model, x, y)[0]) < 1e-6
    assert abs(it["loss"][5] - evaluate(fb.model, x, y)[0]) < 1e-6
    # a midpoint by hand
    mid = {k: 0.5 * fa.model.state_dict()[k] + 0.5 * before[k] for k in before}
    fb.model.load_state_dict(mid)
    assert abs(it["loss"][3] - evaluate(fb.model, x, y)[0]) < 1e-6
    fb.model.load_state_dict(before)
    assert len(set(round(v, 6) for v in it["loss"])) > 3


def test_run_cost_counts_updates_and_gradient_evaluations() -> None:
    """Cost next to the result: recorded counts when the trainer wrote them, else counted from the optimizer calls."""
    from flatness.report.compare import run_cost
    from flatness.report.render import _budget_text

    metrics = [{"step": 960, "seconds": 1.5}, {"step": 1920, "seconds": 2.5}]
    new = run_cost({"method": "sam", "epochs": 60, "updates": 1920, "grad_evals_per_update": 2}, metrics)
    assert new == {"updates": 1920, "grad_evals": 3840, "train_seconds": 4.0}
    old_alt = run_cost({"method": "m-arwp", "epochs": 60, "mix_batches": "alternate"}, metrics)
    assert old_alt["updates"] == 960 and old_alt["grad_evals"] == 1920  # one update per two calls, one gradient per call
    old_sam = run_cost({"method": "sam", "epochs": 60}, metrics)
    assert old_sam["updates"] == 1920 and old_sam["grad_evals"] == 3840
    assert run_cost({"model": "resnet18"}, None) == {"updates": None, "grad_evals": None, "train_seconds": None}
    entries = [{"label": "sam", "config": {"method": "sam", "epochs": 60}, "cost": new}, {"label": "x", "config": {}}]
    assert _budget_text(entries) == "sam: --epochs 60, 1920 updates, 3840 gradient evaluations, 4.0 s training"


def _strict_json(text: str) -> dict:
    def no_constant(name: str) -> None:
        raise AssertionError(f"report.json holds a bare {name}")

    return json.loads(text, parse_constant=no_constant)


@pytest.mark.parametrize("radii", [(0.0, float("nan")), (0.0, float("inf")), (0.0, -0.1), ()])
def test_bad_radii_refused_before_anything_is_written(make_checkpoint, tmp_path: Path, radii) -> None:
    a = make_checkpoint("mlp", hidden=8)
    with pytest.raises(FlatnessError, match="--radii"):
        compare([a], tmp_path / "rep", _settings(radii=radii))
    assert not (tmp_path / "rep").exists()


def test_same_checkpoint_twice_refused(make_checkpoint, tmp_path: Path) -> None:
    a = make_checkpoint("mlp", hidden=8)
    copy = tmp_path / "copy.pt"
    copy.write_bytes(a.read_bytes())
    for pair in ([a, a], [a, copy]):
        with pytest.raises(FlatnessError, match="same checkpoint"):
            compare(pair, tmp_path / "rep", _settings())
    assert not (tmp_path / "rep").exists()


def test_unwritable_out_refused_before_computing(make_checkpoint, tmp_path: Path) -> None:
    a = make_checkpoint("mlp", hidden=8)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FlatnessError, match="cannot"):
        compare([a], blocker / "rep", _settings())
    assert blocker.read_text() == "x"


def test_seed_groups_paired_differences_and_strict_json(make_checkpoint, tmp_path: Path) -> None:
    """Checkpoints labelled as seeds of two methods: mean/sd per method, paired t-interval vs sgd, no bare NaN."""
    from flatness.report.stats import entry_values

    import torch

    from flatness.checkpoint import save_checkpoint

    paths = [make_checkpoint("mlp", seed=s, hidden=8, name=f"a{s}.pt") for s in (0, 1, 2)]
    for s in (0, 1, 2):  # other weights (seed s + 10), recorded as seed s so that the runs pair up
        ck = torch.load(make_checkpoint("mlp", seed=s + 10, hidden=8, name=f"b{s}.pt"), weights_only=True)
        ck["config"]["seed"] = s
        save_checkpoint(tmp_path / f"b{s}.pt", ck)
        paths.append(tmp_path / f"b{s}.pt")
    labels = ["sgd"] * 3 + ["other"] * 3
    r = compare(paths, tmp_path / "rep", _settings(surface="none", surfaces_for="first-per-group"), labels=labels)
    data = _strict_json((tmp_path / "rep" / "report.json").read_text())
    other = data["methods"]["other"]
    assert other["seeds"] == 3 and other["seed_list"] == [0, 1, 2]
    accs = [entry_values(e)["test_acc"] for e in r.entries]
    diffs = [accs[3 + i] - accs[i] for i in range(3)]
    p = other["paired"]["sgd"]["test_acc"]
    assert p["mean"] == pytest.approx(sum(diffs) / 3)
    assert p["wins"] == sum(d > 0 for d in diffs) and p["n"] == 3
    assert "sgd" not in data["methods"]["sgd"]["paired"]
    assert data["conclusion"] and all(("within noise" in c) or ("excludes 0" in c) for c in data["conclusion"])
    assert set(data["kendall_tau"]) >= {"lambda_max", "trace"}


def test_curvature_during_training_section(tmp_path: Path) -> None:
    """curvature.jsonl of a run: numbers in the report section equal a plain computation; SGD gets 2/lr."""
    from flatness.report.figures import curvature_track_figure
    from flatness.report.render import tracking_summary

    track = [{"step": 10, "lambda_max": 4.0, "curvature_seconds": 0.5}, {"step": 20, "lambda_max": 19.0, "curvature_seconds": 0.25},
             {"step": 30, "lambda_max": 12.0, "curvature_seconds": 0.25}]
    e = {"label": "sgd", "config": {"method": "sgd", "lr": 0.1}, "cost": {"train_seconds": 10.0}, "curvature_track": track}
    t = tracking_summary(e)
    assert t == {"points": 3, "first": 4.0, "max": 19.0, "last": 12.0, "threshold": 20.0, "percent": 10.0}
    assert tracking_summary({**e, "config": {"method": "sam", "lr": 0.1}})["threshold"] is None
    assert tracking_summary({**e, "curvature_track": None}) is None
    # the trainer's own measure wins: extra over untracked training; older runs' fraction f of (training + measuring) -> f / (1 - f)
    assert tracking_summary({**e, "training_curve": [{"extra_fraction": 0.04}]})["percent"] == pytest.approx(4.0)
    assert tracking_summary({**e, "training_curve": [{"curvature_fraction": 0.2}]})["percent"] == pytest.approx(25.0)
    assert curvature_track_figure([e], tmp_path).stat().st_size > 5000


def test_report_figures_content(monkeypatch, tmp_path: Path) -> None:
    """Surfaces: one panel per entry, one shared colour scale equal to the data range, labelled axes;
    sharpness on log-log axes; interpolation marks alpha = 0 and explains an off-zero minimum."""
    import numpy as np

    from flatness.report import figures

    kept = {}
    monkeypatch.setattr(figures, "_save", lambda fig, out, name: kept.setdefault(name, fig) and out / name)
    xs = np.linspace(-1, 1, 5).tolist()
    grids = [c * np.exp(np.add.outer(np.square(xs), np.square(xs)) * k) for c, k in ((1.0, 1.0), (10.0, 3.0))]
    entries = [{"label": f"m{k}", "group": f"m{k}", "surface": {"dim": 2, "x": xs, "y": xs, "loss": g.tolist()},
                "sharpness": {"radii": [0.0, 0.01, 0.1], "loss_increase": [0.0, 0.001 * k, 0.1 * k], "stderr": [0, 0, 0]},
                "interpolation": {"alpha": [-0.25, 0.0, 0.5, 1.0], "loss": [1.0, 0.5, 2.0, 0.4]}}
               for k, g in zip((1, 2), grids)]
    figures.surface_figure(entries, tmp_path)
    fig = kept["surfaces.png"]
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["m1", "m2"]
    assert all(ax.get_xlabel() for ax in panels) and panels[0].get_ylabel()
    cbar = [ax for ax in fig.axes if ax not in panels][0]
    lo, hi = np.log10(min(g.min() for g in grids)), np.log10(max(g.max() for g in grids))
    assert cbar.get_ylim() == pytest.approx((lo, hi)) and "shared" in cbar.get_ylabel()
    figures.sharpness_figure(entries, tmp_path)
    ax = kept["sharpness.png"].axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    figures.interpolation_figure(entries, tmp_path)
    fig = kept["interpolation.png"]
    assert any(line.get_xdata()[0] == 0.0 and line.get_linestyle() == "--" for line in fig.axes[0].lines)
    assert any("off alpha = 0" in t.get_text() for t in fig.texts)


def test_read_only_out_is_one_error_before_computing(make_checkpoint, tmp_path: Path, monkeypatch) -> None:
    """The write probe failing (a read-only folder; root ignores modes, so the probe is made to fail) -> FlatnessError, nothing written."""
    import importlib
    import tempfile

    cmp = importlib.import_module("flatness.report.compare")  # the package attribute `compare` is the function

    a = make_checkpoint("mlp", hidden=8)
    out = tmp_path / "rep"
    out.mkdir()

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cmp.tempfile, "mkstemp", read_only)
    with pytest.raises(FlatnessError, match="cannot write the report into .*Permission denied"):
        compare([a], out, _settings())
    monkeypatch.setattr(cmp.tempfile, "mkstemp", tempfile.mkstemp)
    assert list(out.iterdir()) == []

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
    assert "<table" in page and page.count("<tr>") == 1 + 2
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


def test_budget_text_counts_gradient_evaluations() -> None:
    from flatness.report.render import _budget_text

    entries = [
        {"label": "sgd", "config": {"method": "sgd", "epochs": 60}},
        {"label": "sam", "config": {"method": "sam", "epochs": 30}},
        {"label": "m-arwp", "config": {"method": "m-arwp", "epochs": 60, "mix_batches": "alternate"}},
        {"label": "m-arwp same", "config": {"method": "m-arwp", "epochs": 30, "mix_batches": "same"}},
        {"label": "foreign", "config": {"model": "resnet18"}},
    ]
    lines = _budget_text(entries).splitlines()
    assert lines == [
        "sgd: 60 epochs x 1 gradient evaluation(s) per batch = 60 epoch-equivalents",
        "sam: 30 epochs x 2 gradient evaluation(s) per batch = 60 epoch-equivalents",
        "m-arwp: 60 epochs x 1 gradient evaluation(s) per batch, alternate batches = 60 epoch-equivalents",
        "m-arwp same: 30 epochs x 2 gradient evaluation(s) per batch, same batches = 60 epoch-equivalents",
    ]

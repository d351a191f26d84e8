"""``flatness compare --per-layer``: each block's top eigenvalue equals the dense float64 Hessian's diagonal block.

The report measures in the checkpoint's precision (float32), so the
comparison with the float64 reference is to 1e-4 relative.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flatness.analysis import prepare_analysis
from flatness.cli.main import main

SAMPLES = 64


def _dense_blocks(path: Path) -> dict[str, tuple[float, float]]:
    """name -> (top eigenvalue, trace) of each parameter tensor's diagonal block of the float64 Hessian (torch.func.hessian)."""
    a = prepare_analysis(path, samples=SAMPLES, batch_size=SAMPLES)
    (x, y), = a.batches
    model = a.model.double().eval()
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss(flat: torch.Tensor) -> torch.Tensor:
        chunks = dict(zip(names, torch.split(flat, [params[n].numel() for n in names])))
        out = torch.func.functional_call(model, {n: c.view_as(params[n]) for n, c in chunks.items()}, (x.double(),))
        return F.cross_entropy(out, y)

    H = torch.func.hessian(loss)(torch.cat([params[n].reshape(-1) for n in names]))
    blocks, start = {}, 0
    for n in names:
        stop = start + params[n].numel()
        B = H[start:stop, start:stop]
        blocks[n] = (float(torch.linalg.eigvalsh(B)[-1]), float(torch.trace(B)))
        start = stop
    return blocks


def test_per_layer_blocks_match_dense_hessian(make_checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = [make_checkpoint("mlp", seed=s, hidden=6, depth=1) for s in (0, 1)]
    out = tmp_path / "rep"
    code = main(["compare", *map(str, paths), "--out", str(out), "--per-layer", "--samples", str(SAMPLES), "--batch-size", str(SAMPLES),
                 "--surface", "none", "--top-k", "1", "--radii", "0", "--draws", "1", "--trace-matvecs", "9", "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["per_layer"] is True
    for path, entry in zip(paths, report["checkpoints"]):
        dense = _dense_blocks(path)
        assert [b["name"] for b in entry["per_layer"]] == list(dense)
        for b in entry["per_layer"]:
            top, trace = dense[b["name"]]
            assert {"name", "numel", "top_eigenvalue", "trace"} <= set(b)
            assert b["top_eigenvalue"] == pytest.approx(top, rel=1e-4), b["name"]
            if b["numel"] <= 9:  # exact trace (unit vectors) below trace_matvecs; Hutch++ above
                assert b["trace"] == pytest.approx(trace, rel=1e-4, abs=1e-6), b["name"]
    assert (out / "per_layer.png").stat().st_size > 5000
    assert "per_layer.png" in (out / "report.md").read_text()
    assert re.search(r"Per-layer curvature", (out / "report.html").read_text())


def test_per_layer_is_off_by_default_and_keys_the_cache(make_checkpoint, tmp_path: Path) -> None:
    from flatness.report import CompareSettings, compare

    path = make_checkpoint("mlp", seed=0, hidden=6, depth=1)
    base = dict(samples=SAMPLES, batch_size=SAMPLES, surface="none", top_k=1, radii=(0.0,), draws=1, trace_matvecs=9)
    out = tmp_path / "rep"
    r = compare([path], out, CompareSettings(**base))
    assert "per_layer" not in r.entries[0] and not (out / "per_layer.png").exists()
    r = compare([path], out, CompareSettings(**base, per_layer=True), force=True)
    assert r.computed == ["core"] and len(r.entries[0]["per_layer"]) == 2 * 2  # the off-cache is not reused


def test_grouped_bars_one_colour_per_checkpoint() -> None:
    from flatness.plots.per_layer import per_layer_comparison_figure

    rows = {"sgd": [{"name": "a", "top_eigenvalue": 3.0, "trace": 5.0}, {"name": "b", "top_eigenvalue": 1.0, "trace": 2.0}],
            "sam": [{"name": "a", "top_eigenvalue": 0.5, "trace": 1.5}, {"name": "b", "top_eigenvalue": 0.25, "trace": 0.75}]}
    top, trace = per_layer_comparison_figure(rows).axes
    for ax, key in ((top, "top_eigenvalue"), (trace, "trace")):
        bars = ax.containers
        assert [c.get_label() for c in bars] == ["sgd", "sam"]
        assert [[p.get_height() for p in c] for c in bars] == [[b[key] for b in rows[m]] for m in ("sgd", "sam")]
        assert bars[0][0].get_facecolor() != bars[1][0].get_facecolor()

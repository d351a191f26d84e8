"""report.html in headless Chromium: every image loads and the table renders."""

from __future__ import annotations

from pathlib import Path

import pytest

from flatness.report import CompareSettings, compare
from flatness.report.browser import check_report, find_chromium


@pytest.mark.skipif(find_chromium() is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_renders_in_chromium(make_checkpoint, tmp_path: Path) -> None:
    a, b = make_checkpoint("mlp", seed=0, hidden=8), make_checkpoint("mlp", seed=1, hidden=8)
    s = CompareSettings(samples=64, batch_size=64, surface="2d", surface_points=5, top_k=2, tol=1e-3,
                        trace_matvecs=9, radii=(0.0, 0.05), draws=2, interp_points=5, density=True)
    result = compare([a, b], tmp_path / "rep", s)
    verdict = check_report(result.report_html, screenshot=tmp_path / "shot.png")
    assert verdict["images"] >= 5 and verdict["loaded"] == verdict["images"], verdict
    assert verdict["rows"] == 2 and verdict["table_width"] > 100 and verdict["table_height"] > 20, verdict
    assert (tmp_path / "shot.png").stat().st_size > 10_000

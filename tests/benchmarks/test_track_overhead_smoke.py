"""benchmarks/track_overhead.py --quick: the columns, finite costs, the plan and points within their bounds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "track_overhead.py"


def test_quick_run_prints_the_columns_with_finite_numbers() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "track.json"
        proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], cwd=tmp,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (r,) = json.loads(out.read_text())
    lines = proc.stdout.splitlines()
    assert "load average" in lines[0] and "1 thread(s)" in lines[0] and "budget 0.05" in lines[0]
    header = [c.strip() for c in lines[1].strip("|").split("|")]
    assert header[:8] == ["model", "params", "updates", "untracked_s", "tracked_s", "extra_measured", "extra_min", "extra_fraction_in_run"]
    assert "within_bound" in header and "max_rel_bound" in header
    assert "extra_min" in header
    for key in ("untracked_s", "tracked_s", "extra_measured", "extra_min", "extra_fraction_in_run", "max_rel_err", "max_rel_bound"):
        assert math.isfinite(r[key]), key
    assert r["untracked_s"] > 0 and r["extra_fraction_in_run"] > 0 and r["points"] >= 1
    within, points = map(int, r["within_bound"].split("/"))
    assert points == r["points"] and within == points
    assert r["plan"]["budget"] == 0.05 and r["plan"]["start"] >= 1

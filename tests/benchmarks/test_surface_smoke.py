"""benchmarks/surface.py runs at smoke sizes and prints its rows, the floors (issue 25) and the ratios to them."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "surface.py"


def test_smoke_run_prints_floor_rows_with_finite_ratios() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, str(SCRIPT), "--n", "4", "--samples", "100", "--blocks", "2", "--threads", "1", "--no-vmap"],
                              cwd=tmp, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "load average" in lines[0] and "1 thread(s)" in lines[0]
    header = [c.strip() for c in lines[1].strip("|").split("|")]
    assert header == ["method", "seconds", "ms/point", "speedup", "/ floor 1 batch", "/ floor cut", "max dloss", "max dacc"]
    rows = {c[0]: c[1:] for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines[3:])}
    names = [n for n in rows if n.startswith("floor:")]
    assert len(names) == 2 and any(n.startswith("ours (loss_surface") for n in rows) and any(n.startswith("loss-landscape") for n in rows)
    for values in rows.values():
        assert all(math.isfinite(float(v)) and float(v) > 0 for v in values[:5]), values
    assert float(rows[names[0]][3]) == 1.0 and float(rows[names[1]][4]) == 1.0  # each floor over itself

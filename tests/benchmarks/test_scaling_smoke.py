"""benchmarks/scaling.py --quick: every operation's row with finite numbers, the exponents and the figure."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "scaling.py"


def test_quick_run_prints_every_column_and_writes_the_figure() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fig, out = Path(tmp) / "scaling.png", Path(tmp) / "scaling.json"
        proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--figure", str(fig), "--json", str(out)],
                              cwd=tmp, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        data = json.loads(out.read_text())
    lines = proc.stdout.splitlines()
    assert "load average" in lines[0] and "1 thread(s)" in lines[0]
    assert [c.strip() for c in lines[1].strip("|").split("|")] == ["sweep", "model", "params", "samples", "op", "thread_s", "wall_s",
                                                                    "products", "peak_mem_mb"]
    rows = data["rows"]
    assert {r["op"] for r in rows} == {"step", "hvp", "hvp_backward", "top5", "trace", "surface"} and len(rows) == 12
    for r in rows:
        assert all(math.isfinite(r[k]) and r[k] >= 0 for k in ("thread_s", "wall_s", "peak_mem_mb")), r
    assert all(r["products"] > 0 for r in rows if r["op"] in ("hvp", "top5", "trace"))
    assert all(math.isfinite(v) for v in data["exponents"].values()) and "top5 vs samples" in data["exponents"]
    assert "fitted exponents" in proc.stdout

"""benchmarks/eigen_compare.py --quick: every method's row, finite numbers, errors against the float64 reference."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "eigen_compare.py"


def test_quick_run_prints_every_method_with_finite_numbers() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eig.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], cwd=tmp, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        data = json.loads(out.read_text())
    lines = proc.stdout.splitlines()
    assert "load average" in lines[0] and "1 thread(s)" in lines[0]
    header = next(line for line in lines if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["method", "products", "thread_s", "peak_mem_mb", "max_rel_err",
                                                                 "products / ours", "time / ours"]
    for method in ("ours", "pyhessian", "eigenthings_lanczos", "eigenthings_power"):
        r = data[method]
        assert any(line.startswith(f"| {method} |") for line in lines)
        assert len(r["values"]) == 5 and all(math.isfinite(v) for v in r["values"])
        assert r["products"] > 0 and math.isfinite(r["thread_s"]) and math.isfinite(r["max_rel_err"])
    assert data["ours"]["max_rel_err"] < 1e-3  # float32 Lanczos at tol 1e-4 against float64

"""benchmarks/gpu_suite.py runs end to end at smoke sizes on the CPU and prints every row."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_suite.py"
NUMBER_ROWS = [
    "hvp.gradient_ms", "hvp.hvp_ms", "hvp.ratio",
    "eig.ref_lambda1", "eig.ref_lambda5", "eig.ref_mag5",
    "eig.ours_s", "eig.ours_hvps", "eig.ours_max_rel_err",
    "eig.pyhessian_s", "eig.pyhessian_hvps", "eig.pyhessian_max_rel_err",
    "eig.pyhessian_over_ours_time", "eig.pyhessian_over_ours_hvps",
    "surface.vmap_s", "surface.loop_s", "surface.loop_over_vmap", "surface.max_abs_diff",
    "surface.floor_vmap_s", "surface.floor_loop_s", "surface.vmap_over_floor", "surface.vmap_over_loop_floor",
    "optim.sgd_ms", "optim.arwp_ms", "optim.marwp_ms", "optim.arwp_over_sgd", "optim.marwp_over_sgd",
]  # fmt: skip
CUDA_ONLY_ROWS = ["optim.sgd_syncs", "optim.arwp_syncs", "optim.marwp_syncs"]


def test_smoke_run_prints_every_row_with_finite_numbers() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "suite.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--json", str(out)],
            cwd=tmp, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        data = json.loads(out.read_text())
    table = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines() if line.split() and "." in line.split()[0]}
    assert proc.stdout.startswith("device: CPU")
    assert f"torch {data['torch']}" in proc.stdout
    for row in NUMBER_ROWS:
        assert row in table, f"row {row} missing from the table:\n{proc.stdout}"
        assert math.isfinite(float(table[row])), (row, table[row])
        assert math.isfinite(data["rows"][row]), (row, data["rows"][row])
    for row in CUDA_ONLY_ROWS:
        assert table[row] == "n/a" and data["rows"][row] is None
    rows = data["rows"]
    # the numbers mean what the rows say
    assert rows["eig.ours_max_rel_err"] < 1e-4  # float32 Lanczos against the float64 reference
    assert rows["surface.max_abs_diff"] < 1e-5  # vmap and loop evaluate the same surface
    assert rows["eig.ours_hvps"] > 0 and rows["eig.pyhessian_hvps"] > 0
    assert rows["eig.ref_lambda1"] >= rows["eig.ref_lambda5"] > 0
    assert math.isclose(rows["hvp.ratio"], rows["hvp.hvp_ms"] / rows["hvp.gradient_ms"], rel_tol=1e-9)
    assert math.isclose(rows["optim.arwp_over_sgd"], rows["optim.arwp_ms"] / rows["optim.sgd_ms"], rel_tol=1e-9)

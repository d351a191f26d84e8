"""``flatness hessian``: the JSON it writes, overwrite protection, error table, plot, torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flatness.cli.main import main
from tests.conftest import run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: avoid OpenMP spinning on a shared 2-core machine
KEYS = {
    "top_eigenvalues", "residuals", "converged", "hvp_count", "trace", "trace_stderr", "samples",
    "bn_mode", "seconds", "checkpoint", "version", "density",
}  # fmt: skip




def test_writes_every_key(make_checkpoint, tmp_path: Path) -> None:
    from flatness import __version__
    from flatness.analysis import prepare_analysis
    from flatness.curvature import top_eigenvalues

    ckpt = make_checkpoint(model="cnn1d", channels=6, batch_norm=True)
    out = tmp_path / "h.json"
    args = ["--top-k", "3", "--trace", "--density", "--samples", "100", "--batch-size", "40", "--quiet", "--device", "cpu"]
    res = run_cli("hessian", str(ckpt), *args, "--out", str(out), env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    assert "top-3 eigenvalues" in res.stdout and str(out) in res.stdout
    result = json.loads(out.read_text())
    assert KEYS <= set(result)
    ev = result["top_eigenvalues"]
    assert len(ev) == 3 and ev == sorted(ev, reverse=True) and len(result["residuals"]) == 3
    assert result["converged"] is True
    assert result["samples"] == 100 and result["bn_mode"] == "eval" and result["checkpoint"] == str(ckpt)
    assert result["version"] == __version__ and result["seconds"] > 0
    assert result["trace"] is not None and result["trace_stderr"] > 0 and result["trace_method"] == "hutch++"
    counts = result["hvp_counts"]
    assert result["hvp_count"] == counts["eigenvalues"] + counts["trace"] + counts["density"]
    assert counts["trace"] == 99 and counts["density"] == 160
    grid, values = torch.tensor(result["density"]["grid"]), torch.tensor(result["density"]["values"])
    assert float(torch.trapezoid(values, grid)) == pytest.approx(1.0, abs=1e-3)
    # the same numbers as the Python API on the same samples
    a = prepare_analysis(ckpt, samples=100, batch_size=40)
    ref = top_eigenvalues(a.model, a.loss_fn, a.batches, k=3, tol=1e-10, dtype=torch.float64)
    assert torch.allclose(torch.tensor(ev, dtype=torch.float64), ref.eigenvalues, rtol=1e-5, atol=0)


def test_refuses_to_overwrite_without_force(make_checkpoint, tmp_path: Path) -> None:
    ckpt = make_checkpoint(model="mlp", hidden=8, depth=1)
    out = tmp_path / "h.json"
    out.write_text("{}\n")
    before = out.stat()
    res = run_cli("hessian", str(ckpt), "--top-k", "2", "--samples", "50", "--quiet", "--out", str(out), env=ONE_THREAD)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1 and "--force" in res.stderr
    assert out.read_text() == "{}\n" and out.stat().st_mtime_ns == before.st_mtime_ns
    assert main(["hessian", str(ckpt), "--top-k", "2", "--samples", "50", "--quiet", "--out", str(out), "--force"]) == 0
    assert json.loads(out.read_text())["top_k"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".h.json")]  # no temp file left


def _foreign(tmp_path: Path) -> Path:
    from flatness.models import build_model

    path = tmp_path / "foreign.pt"
    torch.save(build_model("mlp", in_features=40, num_classes=10).state_dict(), path)
    return path


ERRORS = [
    (lambda c, t: [str(t / "missing.pt"), "--out", str(t / "o.json")], r"checkpoint .*missing.pt does not exist"),
    (lambda c, t: [str(c), "--out", str(t / "o.txt")], r"--out must name a \.json file"),
    (lambda c, t: [str(_foreign(t)), "--data", "synthetic", "--out", str(t / "o.json")], r"plain state_dict .* pass --model"),
    (lambda c, t: [str(c), "--samples", "100000", "--out", str(t / "o.json")], r"--samples 100000 is more than the 256 samples"),
    (lambda c, t: [str(c), "--top-k", "419", "--max-iter", "1000", "--samples", "20", "--out", str(t / "o.json")], r"--top-k 419 is more than the 418 parameters"),
    (lambda c, t: [str(c), "--top-k", "100000", "--samples", "20", "--out", str(t / "o.json")], r"--max-iter 500 cannot give 100000 eigenvalues.*raise --max-iter"),
    (lambda c, t: [str(c), "--top-k", "5", "--max-iter", "2", "--out", str(t / "o.json")], r"--max-iter 2 cannot give 5 eigenvalues.*raise --max-iter"),
    (lambda c, t: [str(c), "--top-k", "0", "--out", str(t / "o.json")], r"--top-k: expected a positive integer, got 0"),
    (lambda c, t: [str(c), "--tol", "-1", "--out", str(t / "o.json")], r"--tol: expected a positive number, got -1"),
    (lambda c, t: [str(c), "--tol", "nan", "--out", str(t / "o.json")], r"--tol: expected a positive number, got nan"),
    (lambda c, t: [str(c), "--trace", "--trace-matvecs", "2", "--out", str(t / "o.json")], r"--trace-matvecs must be at least 4 for hutch\+\+"),
    (lambda c, t: [str(c), "--per-layer", "row", "--out", str(t / "o.json")], r"--per-layer: invalid choice"),
    (lambda c, t: [str(c), "--dtype", "float16", "--out", str(t / "o.json")], r"--dtype: invalid choice"),
    (lambda c, t: [str(c), "--device", "tpu", "--out", str(t / "o.json")], r"unknown device 'tpu'"),
]


@pytest.mark.parametrize("make_args, message", ERRORS, ids=[m[:30] for _, m in ERRORS])
def test_errors(make_checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture, make_args, message: str) -> None:
    ckpt = make_checkpoint(model="mlp", hidden=8, depth=1)
    try:
        code = main(["hessian", *make_args(ckpt, tmp_path), "--quiet"])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert __import__("re").search(message, err), err
    assert not list(tmp_path.glob("*.json"))


def test_backend_choices_match_the_library() -> None:
    from flatness.cli.hessian import BACKENDS
    from flatness.curvature import BACKENDS as LIBRARY
    from flatness.curvature.spec import BACKENDS as SPEC

    assert BACKENDS == LIBRARY == SPEC


def test_refuses_other_data_unless_allowed(make_checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A checkpoint trained on mnist1d measured on synthetic data: exit 2 naming --allow-other-data; with it, a result."""
    ckpt = make_checkpoint(model="mlp", data="mnist1d", hidden=8, depth=1)
    out = tmp_path / "h.json"
    args = ["hessian", str(ckpt), "--data", "synthetic", "--top-k", "2", "--samples", "40", "--quiet", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "'mnist1d'" in err and "--allow-other-data" in err
    assert not out.exists()
    assert main([*args, "--allow-other-data"]) == 0
    assert json.loads(out.read_text())["dataset"] == "synthetic"


def test_failure_leaves_no_new_folder(make_checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Everything is checked before the first write: a failing run creates neither the file nor its folders."""
    ckpt = make_checkpoint(model="mlp", hidden=8, depth=1)
    out = tmp_path / "new" / "deeper" / "h.json"
    assert main(["hessian", str(ckpt), "--top-k", "5", "--max-iter", "2", "--quiet", "--out", str(out)]) == 2
    assert main(["hessian", str(ckpt), "--top-k", "419", "--samples", "20", "--quiet", "--out", str(out)]) == 2  # fails after loading
    capsys.readouterr()
    assert not (tmp_path / "new").exists()
    assert main(["hessian", str(ckpt), "--top-k", "2", "--samples", "20", "--quiet", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["top_k"] == 2


def test_per_layer_blocks(make_checkpoint, tmp_path: Path) -> None:
    """--per-layer: one entry per tensor (or module) with the block's top eigenvalue and exact trace (small blocks)."""
    from flatness.analysis import prepare_analysis

    ckpt = make_checkpoint(model="mlp", hidden=6, depth=1)
    out = tmp_path / "h.json"
    common = ["--top-k", "2", "--samples", "50", "--dtype", "float64", "--tol", "1e-10", "--trace-matvecs", "400", "--quiet"]
    assert main(["hessian", str(ckpt), *common, "--per-layer", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    a = prepare_analysis(ckpt, samples=50)
    names = [k for k, _ in a.model.named_parameters()]
    assert [b["name"] for b in result["per_layer"]] == names
    assert sum(b["numel"] for b in result["per_layer"]) == result["num_params"]
    assert sum(b["trace"] for b in result["per_layer"]) == pytest.approx(_dense_trace(a), rel=1e-8)
    assert main(["hessian", str(ckpt), *common, "--per-layer", "module", "--force", "--out", str(out)]) == 0
    modules = json.loads(out.read_text())["per_layer"]
    assert [b["name"] for b in modules] == sorted({k.rpartition(".")[0] for k in names}, key=lambda m: names.index(m + ".weight"))


def _dense_trace(a) -> float:  # noqa: ANN001
    """Trace of the Hessian by an explicit double-backward loop (independent of the project's code)."""
    model = a.model.double().eval()
    params = list(model.parameters())
    x = torch.cat([b[0] for b in a.batches]).double()
    y = torch.cat([b[1] for b in a.batches])
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), params, create_graph=True)
    total = 0.0
    for g, p in zip(grads, params):
        flat = g.reshape(-1)
        for i in range(flat.numel()):
            total += float(torch.autograd.grad(flat[i], p, retain_graph=True)[0].reshape(-1)[i])
    return total


def test_plot_draws_the_density(make_checkpoint, tmp_path: Path) -> None:
    ckpt = make_checkpoint(model="mlp", hidden=8, depth=1)
    out = tmp_path / "h.json"
    assert main(["hessian", str(ckpt), "--top-k", "2", "--density", "--density-steps", "20", "--samples", "60", "--quiet", "--out", str(out)]) == 0
    figure = tmp_path / "density.png"
    assert main(["plot", str(out), "--out", str(figure)]) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_match_one(make_checkpoint, tmp_path: Path) -> None:
    """Under torchrun the batches are sharded and every HVP all-reduced; only rank 0 writes."""
    ckpt = make_checkpoint(model="cnn1d", channels=6, batch_norm=True)
    args = ["hessian", str(ckpt), "--top-k", "3", "--trace", "--trace-matvecs", "12", "--samples", "90", "--dtype", "float64", "--tol", "1e-10", "--quiet", "--device", "cpu"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main([*args, "--out", str(one)]) == 0
    env = {**os.environ, **ONE_THREAD}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "flatness", *args, "--out", str(two)]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("wrote ") == 1  # one summary, from rank 0
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2 and a["samples"] == b["samples"] == 90
    assert torch.allclose(torch.tensor(a["top_eigenvalues"]), torch.tensor(b["top_eigenvalues"]), rtol=1e-9, atol=0)
    assert b["trace"] == pytest.approx(a["trace"], rel=1e-9)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["one.json", "two.json"]


def test_plot_draws_the_per_layer_bars(make_checkpoint, tmp_path: Path) -> None:
    ckpt = make_checkpoint(model="mlp", hidden=8, depth=1)
    out = tmp_path / "h.json"
    assert main(["hessian", str(ckpt), "--top-k", "2", "--per-layer", "module", "--trace-matvecs", "8", "--samples", "60", "--quiet", "--out", str(out)]) == 0
    figure = tmp_path / "layers.png"
    assert main(["plot", str(out), "--out", str(figure)]) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

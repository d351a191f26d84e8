"""``flatness surface``: error table, interpolation, PCA + trajectory, SIGKILL + --resume, torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from flatness.cli.main import main
from flatness.checkpoint import save_checkpoint
from flatness.landscape import read_surface
from flatness.models import build_model
from tests.conftest import RUN_DIR, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: avoid OpenMP spinning on a shared 2-core machine




def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _run_dir(tmp_path: Path, epochs: int = 5) -> Path:
    """A run directory whose epoch checkpoints move along a curved path in a 2-D plane to final.pt."""
    torch.manual_seed(0)
    kw = {"in_features": 40, "num_classes": 10}
    net = build_model("cnn1d", **kw)
    final = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    u = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in final.items()}
    v_ = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in final.items()}
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    base = {"model": "cnn1d", "model_kwargs": kw, "dataset": "synthetic", "config": {"model": "cnn1d", "data": "synthetic"}, "metrics": []}
    for e in range(1, epochs + 1):
        t = (epochs - e) / (epochs - 1)
        state = {k: final[k] + t**2 * u[k] + np.sin(np.pi * t) * v_[k] for k in final}
        save_checkpoint(run / "checkpoints" / f"epoch_{e:04d}.pt", {**base, "state_dict": state, "epoch": e, "step": e})
    save_checkpoint(run / "final.pt", {**base, "state_dict": final, "epoch": epochs, "step": epochs})
    return run


ERRORS = [
    (["--x", "-1:1"], r"--x expects MIN:MAX:N"),
    (["--x", "-1:1:0"], r"positive integer, got 0"),
    (["--x", "1:-1:5"], r"MIN must be smaller than MAX"),
    (["--x=-1:1:3", "--dim", "2"], r"--dim 2 needs --y"),
    (["--x", "-1:1:3", "--dim", "1", "--y", "-1:1:3"], r"--y is only used with --dim 2"),
    (["--x", "-1:1:3", "--dim", "2", "--y", "0:0:3"], r"--y 0:0:3: grid MIN must be smaller"),
    (["--x", "-1:1:3", "--directions", "interp"], r"needs one checkpoint \(--to CKPT2\), got 0"),
    (["--x", "-1:1:3", "--y", "-1:1:3", "--directions", "interp", "--to", "{ckpt}"], r"needs two checkpoints"),
    (["--x", "-1:1:3", "--to", "{ckpt}", "--directions", "filter"], r"--to is only used with --directions interp"),
    (["--x", "-1:1:3", "--directions", "pca"], r"--directions pca needs --run"),
    (["--x", "-1:1:3", "--directions", "pca", "--run", "{tmp}"], r"has no checkpoints/epoch_XXXX.pt"),
    (["--x", "-1:1:3", "--to", "{tmp}/nope.pt"], r"checkpoint .*nope.pt does not exist"),
    (["--x", "-1:1:3", "--to", "{mlp}"], r"holds model 'mlp', but the centre checkpoint holds 'cnn1d'"),
    (["--x", "-1:1:3", "--samples", "100000"], r"--samples 100000 is more than the 256 samples"),
    (["--x", "-1:1:3", "--out", "{tmp}/s.txt"], r"--out must be a .h5 file"),
    (["--x", "-1:1:3", "--out", "{existing}"], r"already exists; pass --resume to continue it or --force"),
    (["--x", "-inf:1:3"], r"--x -inf:1:3: grid bounds must be finite numbers, got MIN=-inf"),
    (["--x=-1:nan:3"], r"grid bounds must be finite numbers"),
    (["--x", "-1:1:3", "--to", "{ckpt}"], r"the x direction is zero .*pass --allow-degenerate"),
    (["--x", "-1:1:3", "--y", "-1:1:3", "--to", "{other}", "{other}"], r"x and y directions are parallel.*pass --allow-degenerate"),
    (["--x", "-1:1:3", "--hessian-normalize", "filter"], r"--hessian-normalize is only used with --directions hessian"),
]


@pytest.mark.parametrize(("args", "message"), ERRORS, ids=[m[:30] for _, m in ERRORS])
def test_errors(tmp_path: Path, make_checkpoint, capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:  # noqa: ANN001
    ckpt = make_checkpoint()
    mlp = make_checkpoint(model="mlp", name="mlp.pt")
    existing = tmp_path / "exists.h5"
    existing.write_bytes(b"")
    other = make_checkpoint(seed=5, name="other.pt")
    fill = {"ckpt": str(ckpt), "tmp": str(tmp_path), "mlp": str(mlp), "existing": str(existing), "other": str(other)}
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [a.format(**fill) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out.h5")]
    code, out, err = _cli(capsys, "surface", ckpt, *args, "--quiet")
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created
    assert existing.read_bytes() == b""  # nothing changed


def test_usage_errors_exit_2(make_checkpoint, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    ckpt = make_checkpoint()
    for args in (["--x", "-1:1:3", "--samples", "0"], ["--x", "-1:1:3", "--dim", "3"]):
        assert main(["surface", str(ckpt), *args]) == 2  # main returns the usage error's status
        assert capsys.readouterr().err.startswith("error: ")
    assert main(["surface", str(ckpt)]) == 2  # no --x: only --directions pca picks its own grid
    assert capsys.readouterr().err.startswith("error: --x MIN:MAX:N is required")


def test_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _cli(capsys, "surface", tmp_path / "none.pt", "--x", "-1:1:3", "--out", tmp_path / "a.h5")
    assert code == 2 and "does not exist" in err


def test_resume_with_other_settings_is_refused(tmp_path: Path, make_checkpoint, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    ckpt = make_checkpoint()
    out = tmp_path / "s.h5"
    code, stdout, err = _cli(capsys, "surface", ckpt, "--x", "-1:1:3", "--samples", "32", "--out", out, "--quiet")
    assert code == 0, err
    assert f"wrote {out}: 3 train_loss" in stdout
    code, _, err = _cli(capsys, "surface", ckpt, "--x", "-1:1:3", "--samples", "64", "--out", out, "--resume", "--quiet")
    assert code == 2 and "cannot resume" in err and "samples: 32 in the file, 64 now" in err
    code, _, err = _cli(capsys, "surface", ckpt, "--x", "-1:1:3", "--samples", "64", "--out", out, "--force", "--quiet")
    assert code == 0, err
    code, _, err = _cli(capsys, "surface", ckpt, "--x", "-1:1:3", "--samples", "64", "--out", out, "--resume", "--quiet")
    assert code == 0, err  # complete file, same settings: nothing to do


def test_interpolation_line_hits_both_checkpoints(tmp_path: Path, make_checkpoint, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    from flatness.analysis import prepare_analysis

    a, b = make_checkpoint(seed=0), make_checkpoint(seed=1)
    out = tmp_path / "line.h5"
    code, _, err = _cli(capsys, "surface", a, "--to", b, "--x", "-0.5:1.5:5", "--samples", "64", "--test", "--out", out, "--quiet")
    assert code == 0, err
    s = read_surface(out)
    assert s.settings["directions"] == "interp" and s.settings["ignore"] == "none"
    for path, i in ((a, 1), (b, 3)):  # x = 0 and x = 1
        an = prepare_analysis(path, samples=64)
        with torch.no_grad():
            loss = sum(an.loss_fn(an.model(x), y).item() * len(y) for x, y in an.batches) / an.samples
        assert s["train_loss"][i] == pytest.approx(loss, abs=1e-5)
    assert "test_loss" in s.values


def test_pca_surface_with_trajectory_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _run_dir(tmp_path)
    out = tmp_path / "pca.h5"
    code, _, err = _cli(capsys, "surface", run, "--directions", "pca", "--x", "-0.2:0.2:5", "--y", "-0.2:0.2:4",
                        "--samples", "32", "--out", out, "--quiet")
    assert code == 0, err
    s = read_surface(out)
    assert s.settings["directions"] == "pca" and s.settings["run"] == str(run.resolve())
    ratio = s.extra["explained_variance_ratio_"]
    assert ratio.sum() == pytest.approx(1.0, abs=1e-4)  # the path lies in a plane
    traj = s.trajectory
    assert traj.shape == (5, 2) and np.abs(traj[-1]).max() < 1e-5  # last epoch is the centre
    np.testing.assert_array_equal(s.extra["proj_epochs"], [1, 2, 3, 4, 5])
    fig = tmp_path / "traj.png"
    code, _, err = _cli(capsys, "plot", out, "--kind", "contour", "--trajectory", "--out", fig)
    assert code == 0, err
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _datasets(path: Path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        found["@attrs"] = np.array(sorted((k, str(v)) for k, v in f.attrs.items()))
    return found


def _assert_same_file(a: Path, b: Path) -> None:
    da, db = _datasets(a), _datasets(b)
    assert sorted(da) == sorted(db)
    for key in da:
        assert np.array_equal(da[key], db[key], equal_nan=da[key].dtype.kind == "f"), key


def test_sigkill_then_resume_is_identical(tmp_path: Path, make_checkpoint) -> None:  # noqa: ANN001
    from tests.flatness.landscape.kill_helpers import kill_when_partial

    ckpt = make_checkpoint()
    args = ["surface", str(ckpt), "--x", "-1:1:25", "--y", "-1:1:23", "--samples", "256", "--chunk-size", "3", "--quiet"]
    ref = tmp_path / "ref.h5"
    r = run_cli(*args, "--out", str(ref), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    killed = tmp_path / "killed.h5"
    env = {**os.environ, **ONE_THREAD}
    proc = subprocess.Popen([sys.executable, "-m", "flatness", *args, "--out", str(killed)], cwd=RUN_DIR, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill = kill_when_partial(proc, killed, 25 * 23, at_least=30)
    assert kill.landed, kill  # SIGKILL (-9) while the file held some, not all, cells
    sys.stderr.write(f"[surface] kill landed after {kill.seen} of {kill.total} cells\n")
    r = run_cli(*args, "--out", str(killed), "--resume", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    _assert_same_file(ref, killed)


def test_two_gloo_processes_equal_one(tmp_path: Path, make_checkpoint) -> None:  # noqa: ANN001
    ckpt = make_checkpoint()
    args = ["surface", str(ckpt), "--x", "-1:1:9", "--y", "-1:1:7", "--samples", "64", "--test", "--chunk-size", "4",
            "--device", "cpu", "--quiet"]
    one = tmp_path / "one.h5"
    r = run_cli(*args, "--out", str(one), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    two = tmp_path / "two.h5"
    env = {**os.environ, **ONE_THREAD}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "flatness", *args, "--out", str(two)]
    r = subprocess.run(cmd, cwd=RUN_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1  # only rank 0 reports
    _assert_same_file(one, two)


def test_negative_bounds_both_spellings(tmp_path: Path, make_checkpoint, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    ckpt = make_checkpoint()
    for i, flag in enumerate((["--x", "-1:1:5"], ["--x=-1:1:5"], ["--x", "-.5:1:5"])):
        code, out, err = _cli(capsys, "surface", ckpt, *flag, "--samples", "32", "--out", tmp_path / f"s{i}.h5", "--quiet")
        assert code == 0, err
    assert read_surface(tmp_path / "s0.h5").xcoordinates.tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]


def test_centre_is_the_loss_at_the_origin_or_not_printed(tmp_path: Path, make_checkpoint, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    from flatness.analysis import prepare_analysis

    ckpt = make_checkpoint()
    an = prepare_analysis(ckpt, samples=32)
    with torch.no_grad():
        centre = sum(an.loss_fn(an.model(x), y).item() * len(y) for x, y in an.batches) / an.samples
    code, out, err = _cli(capsys, "surface", ckpt, "--x", "-1:1:1", "--samples", "32", "--out", tmp_path / "a.h5", "--quiet")
    assert code == 2 and "N=1 computes MIN=-1 only" in err  # issue 23: it computed x = -1 alone
    code, out, err = _cli(capsys, "surface", ckpt, "--x", "-1:1:3", "--y=-2:2:5", "--samples", "32", "--out", tmp_path / "b.h5", "--quiet")
    assert code == 0, err
    assert f"centre {centre:.4g}" in out, out
    code, out, err = _cli(capsys, "surface", ckpt, "--x", "-1:1:4", "--samples", "32", "--out", tmp_path / "c.h5", "--quiet")
    assert code == 0 and ", centre " not in out  # 0 is not a grid point of -1:1:4


def test_degenerate_directions_with_the_flag(tmp_path: Path, make_checkpoint, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    ckpt = make_checkpoint()
    out = tmp_path / "flat.h5"
    code, _, err = _cli(capsys, "surface", ckpt, "--to", ckpt, "--x", "-1:1:3", "--samples", "32", "--allow-degenerate", "--out", out, "--quiet")
    assert code == 0, err
    loss = read_surface(out)["train_loss"]
    assert np.ptp(loss) == 0.0  # constant: the direction is zero


def test_a_second_run_on_a_file_being_written_is_refused(tmp_path: Path, make_checkpoint, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    from flatness.landscape.storage import SurfaceLock

    ckpt = make_checkpoint()
    out = tmp_path / "s.h5"
    args = ["surface", ckpt, "--x", "-1:1:5", "--samples", "32", "--out", out, "--quiet"]
    assert _cli(capsys, *args)[0] == 0
    before = out.read_bytes()
    code = f"from flatness.landscape.storage import SurfaceLock; import time; l = SurfaceLock({str(out)!r}); print('locked', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)  # another run writing it
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        for flag in ("--resume", "--force"):
            rc, _, err = _cli(capsys, *args, flag)
            assert rc == 2 and err.count("\n") == 1, err
            assert "is being written by another flatness process" in err
        assert out.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    assert _cli(capsys, *args, "--resume")[0] == 0  # the lock dies with its holder
    SurfaceLock(out).release()


def test_hessian_directions_surface(tmp_path: Path, make_checkpoint, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    ckpt = make_checkpoint(model="mlp")
    out = tmp_path / "h.h5"
    code, _, err = _cli(capsys, "surface", ckpt, "--directions", "hessian", "--x", "-0.5:0.5:5", "--y=-0.5:0.5:3", "--samples", "64",
                        "--hessian-normalize", "filter", "--out", out, "--quiet")
    assert code == 0, err
    s = read_surface(out)
    assert s.settings["directions"] == "hessian" and s.settings["hessian_normalize"] == "filter"
    assert len(s.settings["hessian_eigenvalues"]) == 2 and s.settings["hessian_eigenvalues"][0] >= s.settings["hessian_eigenvalues"][1]
    with h5py.File(out, "r") as f:
        assert f.attrs["directions"] == "hessian" and f.attrs["hessian_normalize"] == "filter"


BRANCHY = '''
import torch
from torch import nn


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        out = self.lin(x)
        return out if float(out.sum()) > -1e9 else -out  # data-dependent control flow: vmap cannot batch it


def build():
    return Branchy()


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    return torch.utils.data.TensorDataset(x, y), torch.utils.data.TensorDataset(x[:16], y[:16])
'''


def test_vmap_fallback_is_said_once_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import flatness.landscape.surface as surface_mod

    (tmp_path / "branchy.py").write_text(BRANCHY)
    torch.manual_seed(0)
    state = {f"lin.{k}": v for k, v in torch.nn.Linear(6, 3).state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    args = ["surface", tmp_path / "w.pt", "--model", f"{tmp_path}/branchy.py:build", "--data", f"{tmp_path}/branchy.py:data",
            "--x", "-1:1:5", "--chunk-size", "2", "--quiet"]
    code, _, err = _cli(capsys, *args, "--eval-mode", "vmap", "--out", tmp_path / "a.h5")
    assert code == 2 and "cannot be evaluated with torch.func.vmap (vmap: " in err and "--eval-mode loop" in err
    assert not (tmp_path / "a.h5").exists()
    # where auto picks vmap (CUDA), it falls back to the loop and says so once
    monkeypatch.setattr(surface_mod, "resolve_method", lambda method, device, loss_fn=None: "loop" if method == "loop" else "vmap")
    code, out, err = _cli(capsys, *args, "--out", tmp_path / "b.h5")
    assert code == 0, err
    assert err.count("warning: this model cannot be evaluated with torch.func.vmap (vmap: ") == 1, err
    assert "using the loop over points" in err and "Traceback" not in err  # (other libraries' warnings may follow)
    assert read_surface(tmp_path / "b.h5").complete


def test_pca_grid_covers_the_trajectory_by_default(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """No --x/--y with --directions pca: the grid spans the projected path and the centre with a margin, recorded in the file."""
    from flatness.plots.surface import surface_figure

    run = _run_dir(tmp_path)
    out = tmp_path / "pca_auto.h5"
    code, _, err = _cli(capsys, "surface", run, "--directions", "pca", "--samples", "32", "--out", out, "--quiet")
    assert code == 0, err
    s = read_surface(out)
    traj = s.trajectory
    assert s.dim == 2 and s.shape == (31, 31)
    for k, coords in enumerate((s.xcoordinates, s.ycoordinates)):
        lo, hi = min(traj[:, k].min(), 0.0), max(traj[:, k].max(), 0.0)
        margin = 0.2 * (hi - lo)
        assert coords.min() == pytest.approx(lo - margin, rel=1e-3) and coords.max() == pytest.approx(hi + margin, rel=1e-3)
    assert s.settings["x"] == f"{s.xcoordinates[0]:g}:{s.xcoordinates[-1]:g}:31" and s.settings["y"].endswith(":31")
    assert "leaves the grid" not in surface_figure(s, trajectory=True).axes[0].get_title()
    code, _, err = _cli(capsys, "surface", run, "--directions", "pca", "--samples", "32", "--out", out, "--resume", "--quiet")
    assert code == 0, err  # resumes with the grid it recorded
    small = tmp_path / "pca_small.h5"
    code, _, err = _cli(capsys, "surface", run, "--directions", "pca", "--x", "-0.01:0.01:3", "--y", "-0.01:0.01:3", "--samples", "32",
                        "--out", small, "--quiet")
    assert code == 0, err  # a given grid is used as given; the figure says the path leaves it
    assert "the trajectory leaves the grid" in surface_figure(small, trajectory=True).axes[0].get_title()
    code, _, err = _cli(capsys, "surface", run, "--dim", "1", "--out", tmp_path / "r.h5")
    assert code == 2 and "--x MIN:MAX:N is required" in err

"""SIGKILL ``flatness surface`` at random moments, resume, and compare with an uninterrupted run.

A 25 x 25 surface of a 1-D CNN on 1,000 MNIST-1D samples (about a second of
work in 25 chunks) is killed repeatedly and resumed each time with
``--resume``. Each kill fires at a random number of computed cells (watched
in the file itself, read without HDF5 locking), so it lands mid-work; the
test asserts that it did (return code -9, a partial file before and after)
and reports how many landed. After every kill the file must open and read;
the finished file must equal an uninterrupted run's: every dataset (NaN
positions included) and every attribute.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import RUN_DIR, run_cli

N = 25
ARGS = ["--dim", "2", "--x", f"-1:1:{N}", "--y", f"-1:1:{N}", "--samples", "1000", "--chunk-size", f"{N}", "--device", "cpu", "--quiet"]
ATTEMPTS = 5


def _h5_contents(path: Path) -> tuple[dict, dict]:
    """``({dataset name: array}, {object name: {attr: value}})`` of every object in an .h5 file."""
    import h5py

    data: dict = {}
    attrs: dict = {}
    with h5py.File(path, "r") as f:
        attrs["/"] = {k: f.attrs[k] for k in f.attrs}

        def visit(name: str, obj) -> None:  # noqa: ANN001 - h5py object
            attrs[name] = {k: obj.attrs[k] for k in obj.attrs}
            if isinstance(obj, h5py.Dataset):
                data[name] = obj[()]

        f.visititems(visit)
    return data, attrs


def _same_arrays(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind == "f":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def _same_attrs(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(_same_arrays(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a)


@pytest.mark.slow
def test_random_kills_then_resume(tmp_path: Path, make_checkpoint, surface_kill_log: list) -> None:
    from flatness.landscape.storage import read_surface

    from flatness.data import load_dataset

    load_dataset("mnist1d")  # fill the dataset cache first, so the reference run's timing is the surface's
    ckpt = make_checkpoint("cnn1d", data="mnist1d", seed=3)
    from tests.flatness.landscape.kill_helpers import kill_when_partial

    ref = tmp_path / "ref.h5"
    r = run_cli("surface", str(ckpt), *ARGS, "--out", str(ref))
    assert r.returncode == 0, r.stderr

    out = tmp_path / "killed" / "surface.h5"
    out.parent.mkdir()
    rng = random.Random(7)
    entry = {"tried": ATTEMPTS, "landed": 0, "survived": 0}
    surface_kill_log.append(entry)
    done = 0
    for attempt in range(ATTEMPTS):
        cmd = [sys.executable, "-m", "flatness", "surface", str(ckpt), *ARGS, "--out", str(out), "--resume"]
        proc = subprocess.Popen(cmd, cwd=RUN_DIR, env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # a random moment in the work left: between one more chunk and all but the last
        left = N * N - done
        target = done + N * rng.randint(1, max(1, left // N - ATTEMPTS + attempt))
        kill = kill_when_partial(proc, out, N * N, at_least=min(target, N * N - N))  # before the last chunk of N cells
        assert kill.landed, f"kill {attempt + 1} did not land mid-work: {kill}"
        entry["landed"] += 1
        surface = read_surface(out)  # what a kill leaves must read (missing cells are NaN)
        assert surface.shape == (N, N)
        done = kill.after
    r = run_cli("surface", str(ckpt), *ARGS, "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr

    ref_data, ref_attrs = _h5_contents(ref)
    got_data, got_attrs = _h5_contents(out)
    assert sorted(ref_data) == sorted(got_data)
    different = [k for k in ref_data if not _same_arrays(ref_data[k], got_data[k])]
    assert not different, f"datasets differ from the uninterrupted run: {different}"
    assert not np.isnan(got_data["train_loss"]).any()
    assert sorted(ref_attrs) == sorted(got_attrs)
    different = [k for k in ref_attrs if not _same_attrs(ref_attrs[k], got_attrs[k])]
    assert not different, f"attributes differ from the uninterrupted run: {different}"
    leftovers = [p.name for p in out.parent.iterdir() if p.name != out.name]
    assert not leftovers, f"a killed run left files behind: {leftovers}"
    entry["survived"] = entry["landed"]


@pytest.fixture(scope="module")
def surface_kill_log():
    log: list = []
    yield log
    survived = sum(e["survived"] for e in log)
    landed = sum(e["landed"] for e in log)
    tried = sum(e["tried"] for e in log)
    sys.stderr.write(f"\n[reliability] surface kills survived: {survived} of {landed} landed ({tried} tried)\n")

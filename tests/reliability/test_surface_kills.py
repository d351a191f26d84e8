"""SIGKILL ``flatness surface`` at random moments, resume, and compare with an uninterrupted run.

A 21 x 21 surface of a 1-D CNN on 3,000 MNIST-1D samples (a few seconds of
work in 21 chunks) is killed repeatedly - during start-up, between chunks,
while a chunk is written - and resumed each time with ``--resume``. After
every kill the file, if it exists, must open and read; the finished file
must equal an uninterrupted run's: every dataset (NaN positions included)
and every attribute.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, RUN_DIR, run_cli

ARGS = ["--dim", "2", "--x", "-1:1:21", "--y", "-1:1:21", "--samples", "3000", "--chunk-size", "21", "--device", "cpu", "--quiet"]
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
    ref = tmp_path / "ref.h5"
    t0 = time.perf_counter()
    r = run_cli("surface", str(ckpt), *ARGS, "--out", str(ref))
    full = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    timed = re.search(r"\(([\d.]+)s\)", r.stdout)  # "wrote ...: ... (2.6s)"
    compute = float(timed.group(1)) if timed else 0.7 * full
    startup = max(full - compute, 0.3)

    out = tmp_path / "killed" / "surface.h5"
    out.parent.mkdir()
    rng = random.Random(7)
    env = {**os.environ}
    kills = 0
    entry = {"tried": ATTEMPTS, "landed": 0, "survived": 0}
    surface_kill_log.append(entry)
    for _ in range(ATTEMPTS):
        cmd = [sys.executable, "-m", "flatness", "surface", str(ckpt), *ARGS, "--out", str(out), "--resume"]
        proc = subprocess.Popen(cmd, cwd=RUN_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # a random moment before the work left would be done: start-up, a chunk, a write
        left = float(np.isnan(read_surface(out)["train_loss"]).mean()) if out.exists() else 1.0
        delay = rng.uniform(0.3, startup + 0.8 * left * compute)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
            kills += 1
            if out.exists():  # what a kill leaves must read (missing cells are NaN)
                surface = read_surface(out)
                assert surface.shape == (21, 21)
        else:
            err = proc.stderr.read().decode()
            proc.stderr.close()
            assert proc.returncode == 0, err[-2000:]
            break
    entry["landed"] = kills
    if not out.exists() or not read_surface(out).complete:
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
    entry["survived"] = kills


@pytest.fixture(scope="module")
def surface_kill_log():
    log: list = []
    yield log
    survived = sum(e["survived"] for e in log)
    landed = sum(e["landed"] for e in log)
    tried = sum(e["tried"] for e in log)
    sys.stderr.write(f"\n[reliability] surface kills survived: {survived} of {landed} landed ({tried} tried)\n")

"""``flatness compare`` and ``scripts/check_report.py``: bad inputs get exit 2, one line, nothing created or changed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("radius", ["nan", "inf", "-0.1"])
def test_bad_radii(make_checkpoint, tmp_path: Path, radius: str) -> None:
    a = make_checkpoint("mlp", hidden=8)
    r = run_cli("compare", str(a), "--out", str(tmp_path / "rep"), "--radii", "0", radius, "--surface", "none", "--samples", "64")
    _one_line_error(r, "--radii")
    assert not (tmp_path / "rep").exists()


def test_same_checkpoint_twice(make_checkpoint, tmp_path: Path) -> None:
    a = make_checkpoint("mlp", hidden=8)
    r = run_cli("compare", str(a), str(a), "--out", str(tmp_path / "rep"), "--surface", "none", "--samples", "64")
    _one_line_error(r, "same checkpoint", "once")
    assert not (tmp_path / "rep").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out(make_checkpoint, tmp_path: Path) -> None:
    a = make_checkpoint("mlp", hidden=8)
    out = tmp_path / "rep"
    out.mkdir()
    out.chmod(0o500)
    try:
        r = run_cli("compare", str(a), "--out", str(out), "--surface", "none")
    finally:
        out.chmod(0o700)
    _one_line_error(r, "cannot write")
    assert list(out.iterdir()) == []


def test_out_below_a_file(make_checkpoint, tmp_path: Path) -> None:
    a = make_checkpoint("mlp", hidden=8)
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    r = run_cli("compare", str(a), "--out", str(blocker / "rep"), "--surface", "none")
    _one_line_error(r, "not a folder")
    assert blocker.read_text() == "keep"


def test_check_report_without_chromium(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text("<html><body></body></html>")
    env = {**os.environ, "PATH": str(tmp_path)}  # no chromium on this PATH
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "check_report.py"), str(page)], env=env,
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    _one_line_error(r, "chromium")
    assert r.stdout == ""

"""The README's commands run as written (issue 23: ``compare runs/sgd-s*/ ...`` named runs the flow never made).

Every line of a fenced ``bash`` block of README.md that runs ``flatness`` is
executed, in README order, in one temporary folder, so a later command sees
what the earlier ones wrote (``runs/sgd`` from "The flow" is what the
landscape and curvature sections analyse). A line fails the test when any of
its commands exits non-zero.

Small settings (the substitution is made HERE, never in the product): unless
``FLATNESS_README_SMALL=0`` is set (then the commands run at full size, for a
manual check that takes hours), :func:`small` rewrites each command:
``--epochs N`` -> ``--epochs 3`` (the PCA example needs 3 checkpoints), every grid axis ``MIN:MAX:N`` -> ``MIN:MAX:5``,
``--samples N`` -> ``--samples 200`` (and adds ``--samples 200`` to
``surface`` / ``hessian`` / ``compare`` lines without one), fewer
density steps, and ``--device cpu --quiet`` on the commands that have them.

Files the README presumes but does not make (your own ``mymod.py``,
``weights.pt``, two checkpoints ``a.pt`` / ``b.pt``) are made by
:func:`presumed` just before the first line that names them.

Lines that cannot run here are listed in :data:`SKIP` with the reason; a
line that is neither run nor listed fails the test, so the list stays
explicit. The commands run in this process through ``flatness.cli.main.main``
(after ``&&``-splitting, quoting and glob expansion as bash does), not in a
subprocess each: the ~20 torch imports alone would take longer than the 60 s
this test may take.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"

# line (exactly as in README.md, stripped) -> why it is not run here
SKIP = {
    "pip install . && flatness demo": "installs the package and trains 12 runs (minutes); tests/cli/test_demo_cli.py runs the demo small",
    "python -m flatness ...": "a placeholder ('the same commands'), not a command",
    "torchrun --nproc_per_node 2 -m flatness train ...": "a placeholder; torchrun runs are tested in tests/cli/test_train_distributed.py",
    "flatness compare runs/sgd-s0 runs/sgd-s1 runs/sam-s0 runs/sam-s1 ... --out report --surface 2d --density --per-layer":
        "elides its list of runs ('...'); the flow's compare line runs",
}

SMALL = os.environ.get("FLATNESS_README_SMALL", "1") != "0"
ANALYSIS = ("surface", "hessian", "compare")


def commands(text: str) -> list[str]:
    """The lines of the ```bash blocks of ``text`` that run flatness (continuations joined, comments and extra spaces dropped)."""
    lines: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())
            if re.search(r"(^|&&\s*|-m\s+)flatness\b", line):
                lines.append(line)
    return lines


def small(argv: list[str]) -> list[str]:
    """The small-settings form of one ``flatness`` command (see the module docstring)."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        m = re.fullmatch(r"(--[xy])=(-?[\d.]+):(-?[\d.]+):\d+", a)
        if m:
            out.append(f"{m[1]}={m[2]}:{m[3]}:5")
        elif a in ("--epochs", "--samples"):
            value = next(it)
            out += [a, "3" if a == "--epochs" else str(min(int(value), 200))]
        else:
            out.append(a)
    command = out[0]
    if command in ANALYSIS and "--samples" not in out:
        out += ["--samples", "200"]
    if command == "hessian" and "--density" in out:
        out += ["--density-steps", "20", "--density-runs", "1"]
    if command in (*ANALYSIS, "train", "demo"):
        out += ["--device", "cpu", "--quiet"]
    return out


MYMOD = '''\
"""The README's own-model example: a model, its data and a loss(model, batch) (made by tests/test_readme_commands.py)."""
import torch
from torch import nn


def build():
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 8, generator=g)
    y = (x[:, :4].argmax(1))
    return (x[:256], y[:256]), (x[256:], y[256:])


def lm_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)
'''


def presumed(line: str, cwd: Path) -> None:
    """Make the files a README line names but no earlier line makes."""
    if "mymod.py" in line and not (cwd / "mymod.py").exists():
        (cwd / "mymod.py").write_text(MYMOD)
    if "weights.pt" in line and not (cwd / "weights.pt").exists():
        import importlib.util

        import torch

        spec = importlib.util.spec_from_file_location("readme_mymod", cwd / "mymod.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        torch.save(mod.build().state_dict(), cwd / "weights.pt")
    for name, run in (("a.pt", "runs/sgd"), ("b.pt", "runs/marwp")):  # two checkpoints: the flow's two runs
        if re.search(rf"(^|\s){re.escape(name)}(\s|$)", line) and not (cwd / name).exists() and (cwd / run / "final.pt").exists():
            shutil.copy(cwd / run / "final.pt", cwd / name)


def run_line(line: str, cwd: Path) -> tuple[int, str]:
    """Run one README line as bash would (``&&`` chains, globs); returns (status, output) of the first failure or the last."""
    from flatness.cli.main import main

    status, output = 0, ""
    tokens = shlex.split(line)
    parts = [[]]
    for t in tokens:
        parts.append([]) if t == "&&" else parts[-1].append(t)
    for words in parts:
        if words[:3] == ["python", "-m", "flatness"]:
            words = words[2:]
        assert words[0] == "flatness", f"not a flatness command: {words!r}"
        argv = [w2 for w in words[1:] for w2 in (sorted(glob.glob(w)) or [w] if any(c in w for c in "*?[") else [w])]
        argv = small(argv) if SMALL else argv
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                status = int(main(argv) or 0)
            except SystemExit as e:  # argparse errors, --help
                status = int(e.code or 0)
        output = f"$ flatness {shlex.join(argv)}\n{buf.getvalue()}"
        if status:
            break
    return status, output


def test_commands_are_found() -> None:
    found = commands(README.read_text())
    assert any(c.startswith("flatness train") for c in found) and any(c.startswith("flatness compare") for c in found)
    stale = [line for line in SKIP if line not in found]
    assert not stale, f"SKIP names lines that are no longer in README.md: {stale}"


def test_small_rewrites_only_sizes() -> None:
    assert small(["surface", "runs/a", "--x=-1:1:51", "--y=-2:2:41", "--out", "s.h5"]) == [
        "surface", "runs/a", "--x=-1:1:5", "--y=-2:2:5", "--out", "s.h5", "--samples", "200", "--device", "cpu", "--quiet"]
    assert small(["train", "--epochs", "60", "--out", "r"]) == ["train", "--epochs", "3", "--out", "r", "--device", "cpu", "--quiet"]
    assert small(["plot", "a.h5", "--out", "a.png"]) == ["plot", "a.h5", "--out", "a.png"]


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ran, failures = [], []
    for line in commands(README.read_text()):
        if line in SKIP:
            continue
        presumed(line, tmp_path)
        status, output = run_line(line, tmp_path)
        ran.append(line)
        if status:
            failures.append(f"README line failed (exit {status}): {line}\n{output[-1500:]}")
    print(f"\n[readme] commands run: {len(ran)}, skipped (listed in SKIP): {len(SKIP)}")
    assert not failures, "\n\n".join(failures)

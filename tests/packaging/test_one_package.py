"""One installed import package: a fresh virtual environment, the wheel, and a hostile working directory.

Research repositories carry their own ``optim.py``, ``optim/`` and ``cli.py``.
The wheel is built from the checkout and installed (without dependencies) into
a new virtual environment whose ``.pth`` file lends it this environment's
site-packages (torch, numpy, ... are not downloaded again). From a folder
holding an ``optim.py``, an ``optim/`` package and a ``cli.py`` that each raise
on import, the installed ``flatness`` must import, report its version and
train; ``pip show -f`` must list nothing at the top level of site-packages but
``flatness`` and its metadata.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # ~30 s: builds a wheel and a virtual environment

BOOBY_TRAP = "raise ImportError('a stray module from the working directory was imported: {name}')\n"


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(python of a new venv with the wheel installed, a working directory full of stray modules)."""
    root = tmp_path_factory.mktemp("onepkg")
    # Build from a copy without build outputs: setuptools reuses a stale build/ folder.
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".venv"))
    wheels = root / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)], cwd=root)
    (wheel,) = wheels.glob("flatness-*.whl")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip())
    # Install first: once this environment's site-packages is lent (it may hold an installed flatness
    # too), pip would call the requirement satisfied and install nothing.
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=root)
    # Lend the new environment this one's dependencies (appended to sys.path, after its own site-packages).
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    (purelib / "zz_flatness_test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")

    work = root / "research_repo"
    (work / "optim").mkdir(parents=True)
    (work / "optim.py").write_text(BOOBY_TRAP.format(name="optim.py"))
    (work / "optim" / "__init__.py").write_text(BOOBY_TRAP.format(name="optim/"))
    (work / "cli.py").write_text(BOOBY_TRAP.format(name="cli.py"))
    return python, work


def _env(python: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_imports_from_a_directory_with_its_own_optim_and_cli(fresh_env):
    python, work = fresh_env
    code = ("from flatness.optim import MARWP; import flatness.training, flatness.sharpness, flatness;"
            "print(flatness.__file__)")
    r = _run([str(python), "-c", code], cwd=work, env=_env(python))
    assert str(python.parents[1]) in r.stdout, f"flatness was not imported from the fresh environment: {r.stdout}"


def test_console_script_and_module_entry_point(fresh_env):
    python, work = fresh_env
    r = _run([str(python.parent / "flatness"), "--version"], cwd=work, env=_env(python))
    assert r.stdout.strip() == "flatness 0.3.0"
    r = _run([str(python), "-m", "flatness", "--version"], cwd=work, env=_env(python))
    assert r.stdout.strip() == "flatness 0.3.0"


def test_trains_m_arwp_from_that_directory(fresh_env):
    python, work = fresh_env
    env = {**_env(python), "FLATNESS_CACHE": str(work / "cache")}
    _run([str(python.parent / "flatness"), "train", "--method", "m-arwp", "--data", "synthetic", "--model", "mlp",
          "--epochs", "1", "--device", "cpu", "--quiet", "--out", "run"], cwd=work, env=env)
    assert (work / "run" / "final.pt").is_file()


def test_nothing_generic_at_the_top_of_site_packages(fresh_env):
    python, work = fresh_env
    r = _run([str(python), "-m", "pip", "show", "-f", "flatness"], cwd=work, env=_env(python))
    files = [line.strip() for line in r.stdout.split("Files:", 1)[1].splitlines() if line.strip()]
    top = {f.split("/", 1)[0] for f in files}
    top = {t for t in top if not t.startswith("flatness-") and not t.startswith("..")}
    assert top == {"flatness"}, f"top-level entries other than flatness: {sorted(top)}"
    assert any(f.startswith("flatness/optim/") for f in files) and any(f.startswith("flatness/cli/") for f in files)

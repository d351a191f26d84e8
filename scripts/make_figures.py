"""Regenerate the README's comparison figures from the demo's outputs.

    python scripts/make_figures.py                 # runs `flatness demo --out demo` if demo/report is missing
    python scripts/make_figures.py --demo /tmp/demo

Copies the demo report's figures into ``figures/`` as ``demo_surfaces.png``
(2D surfaces side by side, shared colour scale), ``demo_density.png``
(spectral densities), ``demo_sharpness.png`` (random-perturbation sharpness
curves), ``demo_eigenvalues.png``, ``demo_interpolation.png`` and
``demo_training.png``, and writes ``figures/demo_summary.md`` (the report's
table).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMES = ["surfaces", "density", "sharpness", "eigenvalues", "interpolation", "training"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", default=str(REPO / "demo"), help="demo folder (made if it has no report)")
    p.add_argument("--figures", default=str(REPO / "figures"))
    args = p.parse_args(argv)
    demo, figures = Path(args.demo), Path(args.figures)
    report = demo / "report"
    if not (report / "report.json").exists():
        cmd = [sys.executable, "-m", "flatness", "demo", "--out", str(demo)] + (["--force"] if demo.exists() else [])
        subprocess.run(cmd, cwd=REPO, check=True)
    figures.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        src = report / f"{name}.png"
        if src.exists():
            shutil.copyfile(src, figures / f"demo_{name}.png")
    md = (report / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    (figures / "demo_summary.md").write_text("\n".join(table) + "\n")
    print(f"figures written to {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

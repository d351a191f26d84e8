"""Regenerate the README's comparison figures from the demo's outputs.

    python scripts/make_figures.py                 # runs `flatness demo --out demo` if demo/report is missing
    python scripts/make_figures.py --demo /tmp/demo

Copies the demo report's figures into ``figures/`` as ``demo_surfaces.png``
(2D surfaces, one per method, shared colour scale), ``demo_sharpness.png``
(random-perturbation sharpness, log-log), ``demo_eigenvalues.png``,
``demo_interpolation.png``, ``demo_training.png`` and
``demo_generalization.png`` (each measure against test accuracy, Kendall
tau), and writes ``figures/demo_summary.md``: the per-method table (mean +-
sd over seeds, cost), the paired differences and the generated conclusion,
exactly as in report.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMES = ["surfaces", "sharpness", "eigenvalues", "interpolation", "training", "generalization"]


def summary_markdown(data: dict) -> str:
    """Methods table, paired differences and conclusion from report.json (no hand edits)."""
    from flatness.report.render import method_rows, paired_rows

    out = []
    for head, rows in (method_rows(data["methods"]), paired_rows(data["methods"])):
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows), ""]
    out += [f"- {c}" for c in data["conclusion"]]
    return "\n".join(out) + "\n"


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
    (figures / "demo_summary.md").write_text(summary_markdown(json.loads((report / "report.json").read_text())))
    print(f"figures written to {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

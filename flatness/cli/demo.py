"""``flatness demo``: the whole flow offline on MNIST-1D."""

from __future__ import annotations

import argparse
from pathlib import Path

from flatness.cli.common import add_command, add_common, positive_int
from flatness.errors import FlatnessError

EXAMPLES = """\
  flatness demo                      # writes demo/ in the current folder
  flatness demo --out /tmp/demo --force
  flatness demo --budget-epochs 20   # a quicker, rougher run
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "demo", "Train SGD, SAM and m-ARWP on MNIST-1D offline with one budget, then compare them.", EXAMPLES)
    p.add_argument("--out", default="demo", help="output folder (runs/ and report/)")
    p.add_argument("--budget-epochs", type=positive_int, default=60, help="budget in one-gradient-per-batch epochs (SGD's epochs)")
    p.add_argument("--samples", type=positive_int, default=1000, help="training samples the analysis uses")
    p.add_argument("--surface", choices=("1d", "2d", "none"), default="2d", help="loss surfaces in the report")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flatness.demo import run_demo
    from flatness.device import resolve_device
    from flatness.report import CompareSettings

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FlatnessError(f"--out {out} exists and is not a folder")
    settings = CompareSettings(samples=args.samples, surface=args.surface, density=True, seed=args.seed)
    result = run_demo(args.out, budget_epochs=args.budget_epochs, seed=args.seed, device=resolve_device(args.device),
                      force=args.force, quiet=args.quiet, settings=settings)
    print(result.summary)
    return 0

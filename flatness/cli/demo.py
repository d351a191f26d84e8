"""``flatness demo``: the whole flow offline on MNIST-1D, several seeds per method."""

from __future__ import annotations

import argparse

from flatness.cli.common import add_command, add_common, positive_int

EXAMPLES = """\
  flatness demo                      # writes demo/ in the current folder
  flatness demo --out /tmp/demo --force
  flatness demo --epochs 20 --seeds 2  # a quicker, rougher run
  flatness demo --methods sgd sgd-2x m-arwp --workers 2
"""

DESCRIPTION = (
    "Train SGD, SGD-2x, SAM and m-ARWP (ASAM with --methods) on MNIST-1D offline (3 seeds each, in parallel processes), then compare "
    "them. Every method makes the same number of parameter updates (--epochs epochs' worth) with the same schedule; "
    "the alternate m-ARWP scheme reads 2x the data epochs for them; sgd-2x gets twice the updates (the two-pass "
    "methods' gradient budget). Hyperparameters: the published recipes (see the report)."
)


def register(sub: argparse._SubParsersAction) -> None:
    from flatness.demo import DEFAULT_METHODS, DEMO_METHODS

    p = add_command(sub, "demo", DESCRIPTION, EXAMPLES)
    p.add_argument("--out", default="demo", help="output folder (runs/ and report/)")
    p.add_argument("--epochs", type=positive_int, default=60, help="epochs' worth of updates for every method")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per method (>= 2)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(DEMO_METHODS), help="methods to run")
    p.add_argument("--workers", type=positive_int, default=None, help="parallel processes (default: the usable CPU cores)")
    p.add_argument("--samples", type=positive_int, default=1000, help="training samples the analysis uses")
    p.add_argument("--surface", choices=("1d", "2d", "none"), default="2d", help="loss surfaces in the report")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flatness.demo import DemoSpec, run_demo
    from flatness.device import resolve_device

    spec = DemoSpec(epochs=args.epochs, seeds=args.seeds, methods=tuple(args.methods), workers=args.workers,
                    samples=args.samples, surface=args.surface, first_seed=args.seed)
    result = run_demo(args.out, spec, device=str(resolve_device(args.device)), force=args.force, quiet=args.quiet)
    print(result.summary)
    return 0

"""``flatness demo``: the whole flow offline on MNIST-1D."""

from __future__ import annotations

import argparse

from cli.common import add_command, add_common, positive_int

EXAMPLES = """\
  flatness demo                      # writes demo/ in the current folder
  flatness demo --out /tmp/demo --force
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "demo", "Train on MNIST-1D offline and summarise the result.", EXAMPLES)
    p.add_argument("--out", default="demo", help="output folder")
    p.add_argument("--epochs", type=positive_int, default=30, help="epochs per method")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flatness.demo import run_demo

    summary = run_demo(args.out, epochs=args.epochs, seed=args.seed, device=args.device, force=args.force, quiet=args.quiet)
    print(summary)
    return 0

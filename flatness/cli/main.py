"""Entry point: ``flatness train | surface | hessian | plot | compare | demo``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from flatness.errors import FlatnessError

# subcommand -> module with ``register(subparsers)``; each sets ``func=run(args) -> int``.
COMMANDS = ("train", "surface", "hessian", "plot", "compare", "demo")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one ``error:`` line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flatness",
        description="Train with flatness-seeking optimizers and measure the flatness reached.",
        epilog="Run 'flatness COMMAND --help' for the options and examples of a command.",
    )
    from flatness.version import __version__

    parser.add_argument("--version", action="version", version=f"flatness {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"flatness.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"flatness.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for user errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except FlatnessError as e:
        if os.environ.get("FLATNESS_DEBUG") == "1":
            traceback.print_exc()
        msg = " ".join(str(e).split())
        sys.stderr.write(f"error: {msg}\n")
        return 2
    except MemoryError as e:
        if os.environ.get("FLATNESS_DEBUG") == "1":
            traceback.print_exc()
        detail = " ".join(str(e).split()) or "MemoryError"
        sys.stderr.write(f"error: out of memory ({detail}); ask for less (grid points, --samples, --batch-size)\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())

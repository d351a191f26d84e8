"""Entry point: ``flatness train | surface | hessian | plot | compare | demo``."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (its one line is written), --help or --version: their status, returned
        return e.code if isinstance(e.code, int) else 2
    args._argv = list(sys.argv[1:] if argv is None else argv)  # what was typed, for strict --resume
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    _log_to_stderr(quiet=bool(getattr(args, "quiet", False)))
    try:
        return int(args.func(args) or 0)
    except FlatnessError as e:
        return _fail(" ".join(str(e).split()))
    except OSError as e:
        if e.errno not in USER_OS_ERRORS:
            raise  # a bug or an environment fault we cannot explain: keep the traceback
        where = f" {e.filename}" if e.filename else ""
        return _fail(f"{os.strerror(e.errno) if e.errno else e}:{where}; {USER_OS_ERRORS[e.errno]}")
    except MemoryError as e:
        detail = " ".join(str(e).split()) or "MemoryError"
        return _fail(f"out of memory ({detail}); ask for less (grid points, --samples, --batch-size)")
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130


# errno -> what the user can do about it. Other OS errors keep their traceback.
USER_OS_ERRORS = {
    errno.EACCES: "check the permissions of that path or choose another --out",
    errno.EPERM: "check the permissions of that path or choose another --out",
    errno.EROFS: "the file system is read-only: choose another --out",
    errno.ENOSPC: "the disk is full: free space or choose another --out",
    errno.EDQUOT: "the disk quota is exceeded: free space or choose another --out",
    errno.EFBIG: "the file grew past the size limit (ulimit -f): raise it or ask for less",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a component of the path is a file, not a folder",
    errno.EISDIR: "give a file, not a folder",
}


def _fail(message: str) -> int:
    """Print ``error: message`` (and the traceback with FLATNESS_DEBUG=1); exit status 2."""
    if os.environ.get("FLATNESS_DEBUG") == "1":
        traceback.print_exc()
    sys.stderr.write(f"error: {message}\n")
    return 2


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is at the time of each record."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # the base class assigns it once; the property wins
        pass


def _log_to_stderr(quiet: bool) -> None:
    """Send the library's ``flatness`` logger (plain progress lines, notices) to stderr, as bare lines."""
    logger = logging.getLogger("flatness")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())

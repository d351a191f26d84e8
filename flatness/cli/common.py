"""Flags and checks shared by the commands (DESIGN.md section 8)."""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path

from flatness.errors import FlatnessError


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples in epilogs as written and shows each option's default once.

    Like argparse's ``ArgumentDefaultsHelpFormatter``, but no ``(default: ...)``
    for a default that says nothing (None, False, an empty list, SUPPRESS), for a
    required option, or when the help text already states its default.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or action.required or not action.option_strings:
            return text
        if action.default in (None, False, argparse.SUPPRESS) or action.default == [] or action.default == {}:
            return text
        return f"{text} (default: %(default)s)"


# Negative numbers that are option values, not options: "-2", "-.5", "-1e-3", "-inf" (argparse's own
# pattern misses exponents, so "--tol -1e-3" failed with "expected one argument" instead of naming the value).
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$")


def add_command(sub: argparse._SubParsersAction, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand parser with an ``Examples:`` epilog."""
    parser = sub.add_parser(name, help=help, description=help, epilog=f"examples:\n{examples}", formatter_class=Formatter)
    parser._negative_number_matcher = NEGATIVE_NUMBER  # type: ignore[attr-defined]
    return parser


def add_common(parser: argparse.ArgumentParser, *, seed: bool = True, force: bool = True) -> None:
    """``--device``, ``--seed``, ``--quiet``, ``--force``."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    if seed:
        parser.add_argument("--seed", type=seed_int, default=0, metavar="N", help=f"random seed, an integer in [0, {SEED_MAX}]")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    if force:
        parser.add_argument("--force", action="store_true", help="overwrite existing outputs")


# One seed range for every command (numpy's and torch's generators both take it).
SEED_MAX = 2**31 - 1


def seed_int(text: str) -> int:
    """argparse type: a seed, an integer in [0, SEED_MAX]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {SEED_MAX}], got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {SEED_MAX}], got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def check_output_file(path: str | Path, force: bool, *, resume: bool = False, flag: str = "--force") -> Path:
    """Refuse to overwrite an existing output file unless ``--force`` (or resuming).

    Also checks that the parent folder exists (it is created if missing).
    """
    path = Path(path)
    if path.exists() and path.is_dir():
        raise FlatnessError(f"output {path} is a folder, expected a file path")
    if path.exists() and not (force or resume):
        raise FlatnessError(f"output {path} already exists; pass {flag} to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlatnessError(f"cannot create folder {path.parent}: {e.strerror}") from None
    try:  # fail now, not after the work: the output is written last
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as e:
        raise FlatnessError(f"cannot write to folder {path.parent}: {e.strerror}") from None
    return path


def check_output_dir(path: str | Path, force: bool, *, resume: bool = False) -> Path:
    """An output folder: refused if it exists and is not empty, unless ``--force``/``--resume``.

    With ``--force`` the old folder's contents are removed first.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FlatnessError(f"output {path} exists and is not a folder")
    if path.exists() and any(path.iterdir()):
        if resume:
            return path
        if not force:
            raise FlatnessError(f"output folder {path} already exists and is not empty; pass --resume to continue it or --force to replace it")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlatnessError(f"cannot create folder {path}: {e.strerror}") from None
    return path


def require_file(path: str | Path, what: str = "file") -> Path:
    path = Path(path)
    if not path.exists():
        raise FlatnessError(f"{what} {path} does not exist")
    if not path.is_file():
        raise FlatnessError(f"{what} {path} is not a file")
    return path


def json_object(text: str) -> dict:
    """argparse type: a JSON object, e.g. ``'{"hidden": 200}'``."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"hidden\": 200}}', got {text!r} ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"hidden\": 200}}', got {text!r}")
    return value


SOURCES_HELP = """\
Your own model, data and loss: --model, --data and --loss take a registry name or a callable spec,
'package.module:name' (imported from PYTHONPATH) or 'path/to/file.py:name'. The model callable returns
an nn.Module (called with --model-kwargs); the data callable returns (train, test) torch datasets,
DataLoaders or (x, y) tensors (called with --data-kwargs); the loss callable is loss(model, batch) ->
the mean loss of the batch. Checkpoints written by 'flatness train' record all three.
"""


def add_sources(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, default: str = "the checkpoint's") -> None:
    """``--model``, ``--model-kwargs``, ``--data``, ``--data-kwargs``, ``--data-dir``, ``--loss`` for an analysis command.

    Each defaults to ``default`` (what the checkpoint recorded); see :data:`SOURCES_HELP`.
    """
    own = "%(default).0s"  # the help states its own default
    parser.add_argument("--model", default=None, metavar="NAME|MODULE:FN", help=f"registry model or callable returning an nn.Module (default: {default}; required for plain state_dicts){own}")
    parser.add_argument("--model-kwargs", type=json_object, default=None, metavar="JSON", help=f"keyword arguments of --model (default: {default}){own}")
    parser.add_argument("--data", default=None, metavar="NAME|MODULE:FN", help=f"dataset name or callable returning (train, test) (default: {default}){own}")
    parser.add_argument("--data-kwargs", type=json_object, default=None, metavar="JSON", help=f"keyword arguments of a --data callable{own}")
    parser.add_argument("--data-dir", default=None, help=f"folder with the CIFAR python-pickle batches{own}")
    parser.add_argument("--loss", default=None, metavar="NAME|MODULE:FN", help=f"cross_entropy, mse, or a callable loss(model, batch) (default: {default}, else cross_entropy){own}")
    parser.add_argument("--allow-other-data", action="store_true", help="measure on --data other than the checkpoint was trained on")
    parser.add_argument("--allow-changed", action="append", metavar="code|data",
                        help="accept the run's own --model/--data/--loss code or data whose content changed since it was trained "
                             "(repeatable; the change is recorded in the output's provenance)")


def sources_from_args(args: argparse.Namespace):  # noqa: ANN201 - flatness.analysis.Sources, imported lazily (torch)
    """The :class:`flatness.analysis.Sources` the flags of :func:`add_sources` name."""
    from flatness.analysis import Sources
    from flatness.provenance.fingerprint import parse_allow_changed

    return Sources(
        model=args.model, model_kwargs=args.model_kwargs, data=args.data, data_kwargs=args.data_kwargs,
        data_dir=args.data_dir, loss=args.loss, allow_other_data=args.allow_other_data,
        allow_changed=parse_allow_changed(args.allow_changed),
    )


def typed_options(args: argparse.Namespace) -> set[str]:
    """The destinations of the options the user TYPED for this command, at any value (a default typed counts).

    Parses the command's own arguments again with every default suppressed,
    so only typed options land in the namespace (abbreviations and
    ``--flag=value`` included, as argparse reads them).
    """
    parser: argparse.ArgumentParser = args._parser
    argv: list[str] = list(getattr(args, "_argv", []))
    if args.command in argv:
        argv = argv[argv.index(args.command) + 1 :]
    saved = [(action, action.default) for action in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        parser._defaults = {}
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults = saved_defaults
    return set(vars(namespace))

"""Import the user's own code named on the command line: ``pkg.mod:callable`` or ``path/file.py:callable``.

``--model``, ``--data`` and ``--loss`` accept either a registry name or such a
spec, so a researcher can point every command at their own ``nn.Module``,
dataset and loss without writing a plugin. The spec string is what a
checkpoint records, so analysis commands can rebuild the same objects later.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flatness.errors import FlatnessError


class UserCodeError(FlatnessError):
    """An exception raised inside the user's own model, data or loss callable.

    The CLI prints it as one ``error:`` line naming the callable and the
    exception; its cause (the original exception) keeps the user's traceback
    for ``FLATNESS_DEBUG=1``.
    """


def user_code_error(what: str, spec: str, e: Exception) -> UserCodeError:
    """``{what} '{spec}' raised {Type}: {first line}``, for an exception raised inside user code."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return UserCodeError(f"{what} {spec!r} raised {type(e).__name__}{': ' + text if text else ''} (FLATNESS_DEBUG=1 shows the traceback)")


def is_user_fault(e: BaseException) -> bool:
    """An exception from user code that is the user's to fix (not ours, not a lack of memory, not Ctrl-C)."""
    if isinstance(e, (FlatnessError, MemoryError)) or not isinstance(e, Exception):
        return False
    return not type(e).__name__.endswith("OutOfMemoryError")  # torch's CUDA OOM: the CLI's out-of-memory line


def is_callable_spec(spec: str) -> bool:
    """Whether ``spec`` names user code (``module:attr`` or ``file.py:attr``) rather than a registry entry."""
    return ":" in spec


def load_callable(spec: str) -> Callable[..., Any]:
    """The callable named by ``spec``.

    Args:
        spec: ``package.module:name`` (imported from ``sys.path``) or
            ``path/to/file.py:name`` (loaded from that file; relative paths
            are taken from the current directory). ``name`` may be dotted
            (``module:Class.factory``).

    Raises:
        FlatnessError: malformed spec, a module or file that cannot be
            imported, or a name that is missing or not callable.
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise FlatnessError(f"{spec!r} is not a callable spec; expected 'package.module:name' or 'path/file.py:name'")
    module = _import_file(target) if target.endswith(".py") else _import_module(target, spec)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise FlatnessError(f"{target} has no attribute {attr!r} (from {spec!r})") from None
    if not callable(obj):
        raise FlatnessError(f"{spec!r} names {type(obj).__name__}, not a callable")
    return obj


def _import_module(name: str, spec: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise FlatnessError(f"cannot import {name!r} for {spec!r}: {e}; is it on PYTHONPATH?") from None


def _import_file(path_str: str) -> Any:
    path = Path(path_str).expanduser().resolve()
    if not path.is_file():
        raise FlatnessError(f"no such file {path_str!r} (from the callable spec); give a path to a .py file")
    # One module object per file and process: building a model and its data from the
    # same file must not execute it twice (and see two copies of its classes).
    name = f"flatness_user_{abs(hash(str(path))):x}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise FlatnessError(f"cannot load {path_str!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except ImportError as e:
        del sys.modules[name]
        raise FlatnessError(f"cannot import {path_str!r}: {e}") from None
    except SyntaxError as e:
        del sys.modules[name]
        raise FlatnessError(f"cannot import {path_str!r}: syntax error at line {e.lineno}: {e.msg}") from None
    return module


def short_name(spec: str) -> str:
    """A file-name-safe short form of a registry name or callable spec, for default output names.

    ``"cnn1d"`` stays ``"cnn1d"``; ``"examples/own_model.py:cnn"`` becomes
    ``"own_model.cnn"``; ``"pkg.models:Net"`` becomes ``"pkg.models.Net"``.

    Example:
        >>> short_name("examples/own_model.py:cnn")
        'own_model.cnn'
    """
    if not is_callable_spec(spec):
        return spec
    target, _, attr = spec.rpartition(":")
    stem = Path(target).stem if target.endswith(".py") else target
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{stem}.{attr}")


def call_with_kwargs(fn: Callable[..., Any], spec: str, kwargs: dict[str, Any], what: str) -> Any:
    """``fn(**kwargs)``, after checking that ``fn`` takes these keyword arguments.

    The check is done on the signature, so a ``TypeError`` raised inside the
    user's own code is not mistaken for a bad ``--model-kwargs`` /
    ``--data-kwargs``: it becomes a :class:`UserCodeError` naming the callable
    (the original exception is its ``__cause__``).

    Raises:
        FlatnessError: ``fn`` does not take ``kwargs`` (names ``what`` and ``spec``).
        UserCodeError: ``fn`` raised.
    """
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        raise FlatnessError(f"{what} {spec!r} does not take these arguments {kwargs}: {e}") from None
    except ValueError:
        pass  # no signature to read (some builtins): the call itself decides
    try:
        return fn(**kwargs)
    except Exception as e:
        if not is_user_fault(e):
            raise
        raise user_code_error(what, spec, e) from e

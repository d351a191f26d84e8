"""flatness.hooks: importing the user's callables named by ``module:name`` / ``file.py:name``."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from flatness.errors import FlatnessError
from flatness.hooks import is_callable_spec, load_callable


def test_module_spec_and_dotted_attribute() -> None:
    assert load_callable("json:dumps") is json.dumps
    assert load_callable("json:JSONEncoder.encode") is json.JSONEncoder.encode


def test_file_spec_is_executed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user.py").write_text("RUNS = []\nRUNS.append(1)\n\ndef build():\n    return len(RUNS)\n\ndef data():\n    return RUNS\n")
    build = load_callable(str(tmp_path / "user.py") + ":build")
    monkeypatch.chdir(tmp_path)
    data = load_callable("user.py:data")  # relative to the current folder: the same file, the same module
    assert build() == 1 and data() == [1]


@pytest.mark.parametrize(
    "spec, source, pattern",
    [
        ("nocolon", None, "not a callable spec"),
        (":build", None, "not a callable spec"),
        ("user.py:", None, "not a callable spec"),
        ("missing.py:build", None, r"no such file 'missing.py'"),
        ("no_such_module_xyz:build", None, r"cannot import 'no_such_module_xyz'"),
        ("user.py:nothing", "def build():\n    pass\n", r"has no attribute 'nothing'"),
        ("user.py:VALUE", "VALUE = 3\n", "names int, not a callable"),
        ("user.py:build", "import no_such_module_xyz\n", r"cannot import 'user.py': No module named 'no_such_module_xyz'"),
        ("user.py:build", "def build(:\n", r"syntax error at line 1"),
    ],
)
def test_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str, source: str | None, pattern: str) -> None:
    monkeypatch.chdir(tmp_path)
    if source is not None:
        (tmp_path / "user.py").write_text(textwrap.dedent(source))
    with pytest.raises(FlatnessError, match=pattern) as info:
        load_callable(spec)
    assert "\n" not in str(info.value)


def test_is_callable_spec() -> None:
    assert is_callable_spec("pkg.mod:fn") and is_callable_spec("a/b.py:fn")
    assert not is_callable_spec("cnn1d") and not is_callable_spec("cross_entropy")


@pytest.mark.parametrize(
    "spec, short",
    [("cnn1d", "cnn1d"), ("examples/own_model.py:cnn", "own_model.cnn"), ("pkg.models:Net.build", "pkg.models.Net.build"), ("C:/a b/m.py:f", "m.f")],
)
def test_short_name(spec: str, short: str) -> None:
    from flatness.hooks import short_name

    assert short_name(spec) == short


def test_call_with_kwargs_checks_the_signature_not_the_body() -> None:
    from flatness.hooks import call_with_kwargs

    def build(width: int = 3) -> int:
        return [1][width]  # an IndexError inside user code stays an IndexError, with its traceback

    with pytest.raises(FlatnessError, match=r"model 'm.py:build' does not take these arguments \{'depth': 2\}"):
        call_with_kwargs(build, "m.py:build", {"depth": 2}, "model")

    def broken() -> None:
        raise TypeError("a bug in the user's code")

    # issue 23: an exception inside the user's callable is one line naming it; the original is its cause
    with pytest.raises(FlatnessError, match=r"data callable 'm.py:broken' raised TypeError: a bug in the user's code") as info:
        call_with_kwargs(broken, "m.py:broken", {}, "data callable")
    assert isinstance(info.value.__cause__, TypeError)
    assert call_with_kwargs(build, "m.py:build", {"width": 0}, "model") == 1

"""flatness/cli/main.py: which failures become one ``error:`` line and which keep their traceback."""

from __future__ import annotations

import errno
import logging

import pytest

from flatness.cli import main as cli_main
from flatness.cli import plot as plot_cmd
from flatness.errors import FlatnessError


def _raising(exc: BaseException):
    def run(args):
        raise exc
    return run


@pytest.mark.parametrize("exc, pattern", [
    (FlatnessError("bad   value\n  for --x"), r"^error: bad value for --x$"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out.png"), r"^error: Permission denied: /ro/out\.png; check the permissions"),
    (OSError(errno.ENOSPC, "No space left on device", "big.h5"), r"^error: No space left on device: big\.h5; the disk is full"),
    (MemoryError(), r"^error: out of memory \(MemoryError\); ask for less"),
])
def test_user_errors_are_one_line_and_exit_2(monkeypatch, capsys, exc, pattern):
    monkeypatch.setattr(plot_cmd, "run", _raising(exc))
    assert cli_main.main(["plot", "in.h5", "--out", "o.png"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").match(pattern, err), err


@pytest.mark.parametrize("exc", [ZeroDivisionError("a bug"), KeyError("missing"), OSError(errno.EBADF, "Bad file descriptor")])
def test_bugs_keep_their_traceback(monkeypatch, exc):
    monkeypatch.setattr(plot_cmd, "run", _raising(exc))
    with pytest.raises(type(exc)):
        cli_main.main(["plot", "in.h5", "--out", "o.png"])


def test_debug_shows_the_traceback_of_a_user_error(monkeypatch, capsys):
    monkeypatch.setenv("FLATNESS_DEBUG", "1")
    monkeypatch.setattr(plot_cmd, "run", _raising(FlatnessError("bad")))
    assert cli_main.main(["plot", "in.h5", "--out", "o.png"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("error: bad")


def test_library_log_lines_reach_stderr_unless_quiet(monkeypatch, capsys):
    def run(args):
        logging.getLogger("flatness.something").info("stage done")
        return 0
    monkeypatch.setattr(plot_cmd, "run", run)
    assert cli_main.main(["plot", "in.h5", "--out", "o.png"]) == 0
    assert capsys.readouterr().err == "stage done\n"

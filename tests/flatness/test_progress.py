"""flatness/progress.py: plain stage lines when stderr is not a terminal."""

from __future__ import annotations

import logging

import pytest

from flatness import progress as prog


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.INFO, logger="flatness")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "flatness"]


def test_piped_iteration_logs_finish(monkeypatch, lines):
    monkeypatch.setattr(prog.sys.stderr, "isatty", lambda: False, raising=False)
    out = list(prog.progress(range(5), desc="epoch 1/3"))
    assert out == [0, 1, 2, 3, 4]
    got = lines()
    assert len(got) == 1 and got[0].startswith("epoch 1/3: finished (5/5 steps) in ")


def test_a_failing_stage_logs_nothing(monkeypatch, lines):
    monkeypatch.setattr(prog.sys.stderr, "isatty", lambda: False, raising=False)
    try:
        with prog.progress(total=3, desc="hessian") as bar:
            bar.update(1)
            raise ValueError("boom")
    except ValueError:
        pass
    assert lines() == []


def test_piped_manual_updates_log_periodically(monkeypatch, lines):
    monkeypatch.setattr(prog.sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setattr(prog, "PLAIN_INTERVAL", 0.0)
    with prog.progress(total=3, desc="surface", unit="pt") as bar:
        for _ in range(3):
            bar.update(1)
    got = lines()
    assert got[0].startswith("surface: running, 1/3 pt after")
    assert len(got) == 4 and got[-1].startswith("surface: finished (3/3 pt)")


def test_quiet_is_silent(monkeypatch, lines):
    monkeypatch.setattr(prog.sys.stderr, "isatty", lambda: False, raising=False)
    list(prog.progress(range(3), quiet=True, desc="x"))
    assert lines() == []

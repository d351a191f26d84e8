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


def test_ctrl_c_says_how_far_it_got_not_finished(monkeypatch, lines):
    """Issue 23: after Ctrl-C the line said "finished (0/2 steps)"."""
    monkeypatch.setattr(prog.sys.stderr, "isatty", lambda: False, raising=False)
    with pytest.raises(KeyboardInterrupt):
        bar = prog.progress(range(2), desc="epoch 1/1")
        with bar:
            for i in bar:
                if i == 1:
                    raise KeyboardInterrupt
    got = lines()
    assert len(got) == 1 and got[0].startswith("epoch 1/1: stopped after 1/2 steps in "), got


def test_a_manual_stage_interrupted_in_a_finally_says_stopped(monkeypatch, lines):
    monkeypatch.setattr(prog.sys.stderr, "isatty", lambda: False, raising=False)
    bar = prog.progress(total=5, desc="surface", unit="pt")
    with pytest.raises(KeyboardInterrupt):
        try:
            bar.update(3)
            raise KeyboardInterrupt
        finally:
            bar.close()
    assert [ln.split(" in ")[0] for ln in lines()] == ["surface: stopped after 3/5 pt"]


def test_an_abandoned_loop_logs_nothing_later(monkeypatch, lines):
    monkeypatch.setattr(prog.sys.stderr, "isatty", lambda: False, raising=False)
    for _ in prog.progress(range(3), desc="x"):
        break
    import gc

    gc.collect()
    assert not any("finished" in ln for ln in lines())


def test_short_stages_do_not_read_zero_seconds(monkeypatch, lines):
    """Issue 23: "finished in 0.0 s" next to the command's "(0.8s)"."""
    monkeypatch.setattr(prog.sys.stderr, "isatty", lambda: False, raising=False)
    list(prog.progress(range(2), desc="s"))
    assert " in 0.0 s" not in lines()[0] and " in 0 s" not in lines()[0]
    assert prog.duration(0.0312) == "0.031 s" and prog.duration(2.46) == "2.5 s" and prog.duration(125.4) == "125 s"


@pytest.mark.parametrize(("rank", "expected"), [("0", 1), ("1", 0), ("3", 0)])
def test_only_rank_0_reports_under_torchrun(monkeypatch, lines, rank, expected):
    monkeypatch.setattr(prog.sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setenv("RANK", rank)
    list(prog.progress(range(2), desc="epoch 1/1"))
    assert len(lines()) == expected

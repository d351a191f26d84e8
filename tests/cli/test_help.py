"""Every option of every command: a help line, its default shown once, the same names and ranges everywhere (issue 23)."""

from __future__ import annotations

import argparse
import re

import pytest

from flatness.cli.main import build_parser
from tests.conftest import run_cli


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction) and a.help is not argparse.SUPPRESS]


def _help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help of one action as ``--help`` prints it (defaults expanded, whitespace joined)."""
    formatter = parser._get_formatter()
    return " ".join(formatter._expand_help(action).split()) if action.help else ""


ALL = [(name, a) for name, p in _commands().items() for a in _options(p)]


@pytest.mark.parametrize(("command", "action"), ALL, ids=[f"{n}-{a.dest}" for n, a in ALL])
def test_every_option_has_help_and_states_its_default_at_most_once(command: str, action: argparse.Action) -> None:
    parser = _commands()[command]
    text = _help_text(parser, action)
    assert text.strip(), f"flatness {command} {'/'.join(action.option_strings) or action.dest}: no help"
    assert len(re.findall(r"default", text, re.I)) <= 1, f"flatness {command}: {text!r} states its default more than once"
    assert "(default: None)" not in text and "(default: False)" not in text, text
    if action.required:
        assert "default" not in text.lower(), f"required option with a default in its help: {text!r}"


@pytest.mark.parametrize(("command", "dest"), [
    ("train", "batch_size"), ("train", "lr"), ("train", "momentum"), ("train", "weight_decay"), ("train", "schedule"),
    ("compare", "batch_size"), ("compare", "surface"), ("compare", "top_k"), ("compare", "trace_matvecs"),
    ("hessian", "top_k"), ("hessian", "samples"), ("demo", "epochs"),
])  # fmt: skip
def test_a_valued_option_shows_its_default(command: str, dest: str) -> None:
    parser = _commands()[command]
    action = next(a for a in _options(parser) if a.dest == dest)
    assert "default" in _help_text(parser, action).lower()


def test_one_name_means_one_thing() -> None:
    """`--method` is the optimizer (train); the surface evaluator is `--eval-mode`. `--per-layer` takes the same values everywhere."""
    cmds = _commands()
    surface = {s for a in _options(cmds["surface"]) for s in a.option_strings}
    assert "--eval-mode" in surface
    per_layer = {name: next(a for a in _options(cmds[name]) if a.dest == "per_layer") for name in ("hessian", "compare")}
    assert per_layer["hessian"].choices == per_layer["compare"].choices == ("tensor", "module")
    assert per_layer["hessian"].nargs == per_layer["compare"].nargs == "?"


def test_seed_ranges_agree() -> None:
    """`demo --seed` and `train --seed` (and every other command's) accept the same range."""
    cmds = _commands()
    for name in ("train", "demo", "surface", "hessian", "compare"):
        seed = next(a for a in _options(cmds[name]) if a.dest == "seed")
        with pytest.raises(argparse.ArgumentTypeError):
            seed.type(str(2**31))
        assert seed.type(str(2**31 - 1)) == 2**31 - 1
        assert seed.type("0") == 0


def test_train_data_help_names_the_file_form() -> None:
    parser = _commands()["train"]
    assert "file.py:fn" in _help_text(parser, next(a for a in _options(parser) if a.dest == "data"))


def test_old_surface_method_spelling_still_works_with_a_notice(tmp_path, make_checkpoint) -> None:
    ckpt = make_checkpoint("mlp")
    r = run_cli("surface", str(ckpt), "--x=-1:1:3", "--method", "loop", "--samples", "64", "--device", "cpu", "--quiet", "--out", str(tmp_path / "s.h5"))
    assert r.returncode == 0, r.stderr
    assert "--method is deprecated" in r.stderr and "--eval-mode" in r.stderr
    r = run_cli("compare", str(ckpt), "--per-layer", "--samples", "64", "--surface", "none", "--top-k", "1", "--draws", "1",
                "--device", "cpu", "--quiet", "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr

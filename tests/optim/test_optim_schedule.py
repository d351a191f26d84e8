"""optim/schedule.py: CosineInc."""

from __future__ import annotations

import math

import pytest
import torch
from optim_helpers import roundtrip

from flatness import optim


def _opt(sigma=0.001, **kwargs):
    return optim.ARWP([torch.nn.Parameter(torch.zeros(2))], torch.optim.SGD, lr=0.1, sigma=sigma, **kwargs)


def test_values_follow_the_formula():
    opt = _opt()
    sched = optim.CosineInc(opt, total_steps=10, inc=10)
    seen = [opt.param_groups[0]["sigma"]]
    for _ in range(12):
        sched.step()
        seen.append(opt.param_groups[0]["sigma"])
    for t, sigma in enumerate(seen):
        tt = min(t, 10)
        expected = 0.001 * (1 + 10 * (1 - math.cos(math.pi * tt / 10)) / 2)
        assert sigma == pytest.approx(expected, rel=1e-12)
    assert seen[0] == pytest.approx(0.001)
    assert seen[5] == pytest.approx(0.006)
    assert seen[10] == seen[12] == pytest.approx(0.011)


def test_matches_official_cosineinc_inside_the_run():
    # official: base * (-cos(step * pi / T) * 0.5 + 0.5) * inc + base
    opt = _opt(sigma=0.02)
    sched = optim.CosineInc(opt, total_steps=7, inc=3)
    for step in range(8):
        official = 0.02 * ((-math.cos(step * math.pi / 7) * 0.5 + 0.5) * 3 + 1)
        assert opt.param_groups[0]["sigma"] == pytest.approx(official, rel=1e-12)
        sched.step()


def test_per_group_initial_sigma_and_resume():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    groups = [{"params": params[:1]}, {"params": params[1:], "sigma": 0.1}]
    opt = optim.MARWP(groups, torch.optim.SGD, lr=0.1, sigma=0.01)
    sched = optim.CosineInc(opt, total_steps=4, inc=1)
    sched.step()
    sched.step()
    assert [g["sigma"] for g in opt.param_groups] == pytest.approx([0.015, 0.15])
    saved = roundtrip({"opt": opt.state_dict(), "sched": sched.state_dict()})
    groups = [{"params": params[:1]}, {"params": params[1:], "sigma": 0.1}]
    opt2 = optim.MARWP(groups, torch.optim.SGD, lr=0.1, sigma=0.01)
    opt2.load_state_dict(saved["opt"])
    sched2 = optim.CosineInc(opt2, total_steps=4, inc=1)
    sched2.load_state_dict(saved["sched"])
    sched.step()
    sched2.step()
    assert [g["sigma"] for g in opt2.param_groups] == [g["sigma"] for g in opt.param_groups]


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"total_steps": 0, "inc": 1.0}, ValueError, r"Invalid total_steps value: 0"),
        ({"total_steps": 10, "inc": -2.0}, ValueError, r"Invalid inc value: -2\.0 \(expected inc >= -1\)"),
        ({"total_steps": 1.5, "inc": 1.0}, TypeError, r"total_steps must be an int"),
    ],
)
def test_invalid_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        optim.CosineInc(_opt(), **kwargs)


def test_refuses_optimizers_without_sigma():
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="has no 'sigma'"):
        optim.CosineInc(sgd, total_steps=3, inc=1)

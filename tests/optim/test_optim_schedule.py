"""optim/schedule.py: CosineInc and StepOnUpdate."""

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


def _official_cosineinc(std, num_epochs, steps_per_epoch, inc):
    """nblt/mARWP train_marwp.py's CosineInc, transcribed."""
    half = num_epochs * steps_per_epoch

    def at(step):
        return std * ((-math.cos(step * math.pi / half) * 0.5 + 0.5) * inc + 1)

    return at


def test_from_range_is_the_official_incstd_flag():
    # official: CosineInc(args.weight_decay, args.epochs (doubled), len(train_loader),
    #                     args.sigma / args.weight_decay - 1), stepped once per batch
    wd, sigma, epochs, batches_per_epoch = 5e-4, 0.015, 2 * 3, 4
    official = _official_cosineinc(wd, epochs, batches_per_epoch, sigma / wd - 1)
    opt = optim.MARWP(
        [torch.nn.Parameter(torch.zeros(2))], torch.optim.SGD, lr=0.1, weight_decay=wd,
        sigma=sigma, mix_batches="alternate",
    )
    sched = optim.CosineInc.from_range(opt, total_steps=epochs * batches_per_epoch, start=wd, end=sigma)
    for step in range(epochs * batches_per_epoch + 1):
        assert opt.param_groups[0]["sigma"] == pytest.approx(official(step), rel=1e-12)
        sched.step()
    assert opt.param_groups[0]["sigma"] == pytest.approx(sigma, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [({"start": 0.0, "end": 0.01}, r"Invalid start value: 0\.0"), ({"start": 1e-3, "end": -1.0}, r"Invalid end value")],
)
def test_from_range_refuses_bad_endpoints(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        optim.CosineInc.from_range(_opt(), total_steps=4, **kwargs)


def _lr_run(mix_batches, calls, wrap=True):
    net = torch.nn.Linear(3, 1)
    opt = optim.MARWP(net.parameters(), torch.optim.SGD, lr=1.0, sigma=0.01, mix_batches=mix_batches, seed=0)
    inner = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sched = optim.StepOnUpdate(inner, opt) if wrap else inner
    x = torch.randn(4, 3)

    def closure():
        loss = net(x).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(calls):
        opt.step(closure)
        sched.step()
    return opt, sched


def test_step_on_update_decays_once_per_update_in_alternate_mode():
    opt, sched = _lr_run("alternate", calls=4)
    assert opt.num_updates == 2
    assert sched.num_steps == 2
    assert opt.param_groups[0]["lr"] == 0.25  # 2 decays, not 4
    assert sched.get_last_lr() == [0.25]
    # the unwrapped scheduler is what the wrapper fixes: 4 decays for 2 updates
    opt, _ = _lr_run("alternate", calls=4, wrap=False)
    assert opt.param_groups[0]["lr"] == 0.0625


def test_step_on_update_steps_every_call_when_every_call_updates():
    opt, sched = _lr_run("same", calls=3)
    assert opt.num_updates == sched.num_steps == 3
    assert opt.param_groups[0]["lr"] == 0.125
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)  # no flag: every call counts
    wrapped = optim.StepOnUpdate(torch.optim.lr_scheduler.StepLR(sgd, 1, gamma=0.5), sgd)
    sgd.step()
    assert wrapped.step() is True


def test_step_on_update_state_round_trip():
    opt, sched = _lr_run("alternate", calls=3)
    saved = roundtrip(sched.state_dict())
    inner = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    again = optim.StepOnUpdate(inner, opt)
    again.load_state_dict(saved)
    assert again.num_steps == sched.num_steps == 1
    assert again.scheduler.last_epoch == sched.scheduler.last_epoch


def test_step_on_update_type_errors():
    opt = _opt()
    with pytest.raises(TypeError, match="step\\(\\) method"):
        optim.StepOnUpdate(object(), opt)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        optim.StepOnUpdate(torch.optim.lr_scheduler.StepLR(opt, 1), object())

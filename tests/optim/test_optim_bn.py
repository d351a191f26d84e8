"""optim/bn.py and the BatchNorm contract of the optimizers."""

from __future__ import annotations

import pytest
import torch
from optim_helpers import batches, make_closure, make_opt, model

from flatness import optim


def _bn_state(net):
    return [t.clone() for t in (net.bn.running_mean, net.bn.running_var, net.bn.num_batches_tracked)]


def test_disable_running_stats_freezes_and_restores():
    net = model()
    before = _bn_state(net)
    with optim.disable_running_stats(net):
        net(batches(1)[0][0])
        assert net.bn.track_running_stats is False
    for a, b in zip(before, _bn_state(net)):
        assert torch.equal(a, b)
    assert net.bn.track_running_stats is True
    net(batches(1)[0][0])
    assert not torch.equal(before[0], net.bn.running_mean)


def test_disable_running_stats_restores_on_error():
    net = model()
    with pytest.raises(RuntimeError):
        with optim.disable_running_stats(net):
            raise RuntimeError("boom")
    assert net.bn.track_running_stats is True


def test_none_model_is_a_noop():
    """``None`` freezes nothing (optimizers without ``model=`` call it
    unconditionally): the block runs, BatchNorm layers keep recording, and
    errors from the block propagate unchanged."""
    net = model()
    x = batches(1)[0][0]
    ran = []
    with optim.disable_running_stats(None):
        net(x)
        ran.append(True)
    assert ran == [True]
    assert net.bn.track_running_stats is True
    assert int(net.bn.num_batches_tracked) == 1
    with pytest.raises(KeyError, match="inside"):
        with optim.disable_running_stats(None):
            raise KeyError("inside")


@pytest.mark.parametrize("name", ["sam", "asam", "delta-sam", "m-rwp", "m-arwp"])
def test_perturbed_pass_leaves_running_stats_alone(name):
    x, y = batches(1)[0]
    reference = model()
    reference(x)  # exactly one clean forward in train mode
    net = model()
    opt = make_opt(name, net)
    opt.step(make_closure(opt, net, x, y))
    for a, b in zip(_bn_state(reference), _bn_state(net)):
        assert torch.equal(a, b)


def test_without_model_the_stats_see_both_passes():
    x, y = batches(1)[0]
    net = model()
    opt = make_opt("sam", net, model=None)
    opt.step(make_closure(opt, net, x, y))
    assert int(net.bn.num_batches_tracked) == 2


def test_single_pass_rwp_records_its_only_pass():
    x, y = batches(1)[0]
    net = model()
    opt = make_opt("arwp", net)
    opt.step(make_closure(opt, net, x, y))
    assert int(net.bn.num_batches_tracked) == 1

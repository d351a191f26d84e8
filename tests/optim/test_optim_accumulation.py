"""Gradient accumulation and step() without a closure (issue 24).

The contract (docs/methods.md, "Gradient accumulation"):

* ``step(closure)`` refuses, with one ValueError line that names accumulation,
  any gradient in ``.grad`` that it did not leave there itself (the applied
  gradient of the last update, untouched since) or that ``opt.zero_grad()``
  did not leave - never drops it silently.
* Accumulation is done, exactly, through ``first_step()`` / ``second_step()``:
  backward of every micro-batch at w, ``first_step()``, backward of every
  micro-batch at w + eps, ``second_step()`` (RWP/ARWP: ``first_step()``, the
  micro-batches, ``second_step()``) - the same update as one step on the
  whole batch.
* ``step()`` without a closure: one TypeError line naming
  ``flatness.integrations.hf``, ``flatness.integrations.lightning`` and the
  ``first_step()`` / ``second_step()`` route.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from optim_helpers import METHODS, batches, make_closure, make_opt, model, snapshot

from flatness import optim

CLASSES = [optim.SAM, optim.ASAM, optim.DeltaSAM, optim.RWP, optim.ARWP, optim.MRWP, optim.MARWP]
HYPER = {
    "sam": {"rho": 0.05},
    "asam": {"rho": 0.5, "adaptive_eta": 0.01},
    "rwp": {"sigma": 0.05},
    "arwp": {"sigma": 0.05, "eta": 0.5, "beta": 0.9},
    "m-rwp": {"sigma": 0.05, "lam": 0.5},
    "m-arwp": {"sigma": 0.05, "lam": 0.5, "eta": 0.5, "beta": 0.9},
}
EXACT = {"sam": optim.SAM, "asam": optim.ASAM, "rwp": optim.RWP, "arwp": optim.ARWP, "m-rwp": optim.MRWP, "m-arwp": optim.MARWP}


# ------------------------------------------------------------------ no closure
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_step_without_closure_says_what_to_use_in_one_line(cls):
    opt = cls([torch.nn.Parameter(torch.zeros(2))], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError) as info:
        opt.step()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{cls.__name__}.step() needs a closure")
    for needed in ("flatness.integrations.hf", "flatness.integrations.lightning", "first_step()", "second_step()"):
        assert needed in message, needed


@pytest.mark.parametrize("cls", [optim.ParallelMARWP, optim.ParallelMRWP], ids=lambda c: c.__name__)
def test_parallel_step_without_closure_is_one_line(cls):
    opt = object.__new__(cls)  # no process group needed for the message
    message = opt._no_closure_message()
    assert "\n" not in message and message.startswith(f"{cls.__name__}.step() needs a closure")


# ------------------------------------------------------------ refused, not dropped
@pytest.mark.parametrize("name", list(METHODS))
def test_plain_accumulating_loop_is_refused_not_dropped(name):
    """The loop of every accumulation tutorial: backward per micro-batch, step every k."""
    net = model()
    opt = make_opt(name, net)
    before = [p.detach().clone() for p in net.parameters()]
    data = batches(2)
    opt.zero_grad()
    for x, y in data[:1]:  # micro-batch 1 of 2
        F.cross_entropy(net(x), y).backward()
    accumulated = [p.grad.clone() for p in net.parameters()]
    x, y = data[1]
    with pytest.raises(ValueError) as info:
        opt.step(make_closure(opt, net, x, y))
    message = str(info.value)
    assert "\n" not in message
    assert "accumulat" in message and "zero_grad()" in message and "first_step()" in message
    for p, w, g in zip(net.parameters(), before, accumulated):  # refused before anything was touched
        assert torch.equal(p, w) and torch.equal(p.grad, g)


@pytest.mark.parametrize("name", list(METHODS))
def test_the_gradient_a_step_leaves_behind_is_not_accumulation(name):
    """No zero_grad() between steps (Lightning zeroes inside its closure): accepted;
    zero_grad(set_to_none=False) through the optimizer: accepted."""
    net = model()
    opt = make_opt(name, net)
    for t, (x, y) in enumerate(batches(4)):
        if t == 2:
            opt.zero_grad(set_to_none=False)
        opt.step(make_closure(opt, net, x, y))
    assert opt.num_updates == (2 if name == "m-arwp-alt" else 4)


@pytest.mark.parametrize("name", ["sam", "rwp", "m-arwp"])
def test_backward_into_the_left_gradient_is_refused(name):
    """The applied gradient left in .grad, back-propagated into again, is accumulation;
    so is a zeroing the optimizer did not see (model.zero_grad(set_to_none=False): its
    values cannot be read without a host sync)."""
    net = model()
    opt = make_opt(name, net)
    (x, y), (x2, y2) = batches(2)
    opt.step(make_closure(opt, net, x, y))
    F.cross_entropy(net(x2), y2).backward()
    with pytest.raises(ValueError, match="accumulated"):
        opt.step(make_closure(opt, net, x2, y2))
    opt.zero_grad()
    opt.step(make_closure(opt, net, x2, y2))
    net.zero_grad(set_to_none=False)
    with pytest.raises(ValueError, match="accumulated"):
        opt.step(make_closure(opt, net, x2, y2))


def test_rwp_first_step_refuses_gradients_it_would_drop():
    net = model()
    opt = make_opt("rwp", net)
    x, y = batches(1)[0]
    F.cross_entropy(net(x), y).backward()
    with pytest.raises(ValueError, match=r"RWP\.first_step\(\) found gradients in \.grad.*zero_grad\(\)"):
        opt.first_step()
    opt.zero_grad()
    opt.first_step()
    opt.cancel_step()


def test_sam_first_step_refuses_backward_into_the_previous_update():
    net = model()
    opt = make_opt("sam", net)
    (x, y), (x2, y2) = batches(2)
    opt.step(make_closure(opt, net, x, y))
    F.cross_entropy(net(x2), y2).backward()  # no zero_grad(): onto the applied gradient
    with pytest.raises(ValueError, match=r"previous update's gradient.*zero_grad\(\)"):
        opt.first_step()


# ------------------------------------------------------------ accumulation, exact
class Tiny(torch.nn.Module):
    """No BatchNorm: micro-batches then give exactly the whole batch's gradient."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _opt(name, net):
    return EXACT[name](net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, seed=0, **HYPER[name])


@pytest.mark.parametrize("micro", [2, 4])
@pytest.mark.parametrize("name", list(EXACT))
def test_accumulating_through_first_and_second_step_is_the_whole_batch_step(name, micro):
    data = [(x.double(), y) for x, y in batches(3, size=16)]
    net_a = Tiny().double()
    opt_a = _opt(name, net_a)
    for x, y in data:

        def closure(x=x, y=y):
            loss = F.cross_entropy(net_a(x), y)  # float64 throughout
            loss.backward()
            return loss

        opt_a.step(closure)
    net_b = Tiny().double()
    opt_b = _opt(name, net_b)
    single = name in ("rwp", "arwp")

    def accumulate(x, y):
        for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
            (F.cross_entropy(net_b(xm), ym) * (len(ym) / len(y))).backward()

    for x, y in data:  # the documented pattern
        opt_b.zero_grad()
        if not single:
            accumulate(x, y)  # at w
        opt_b.first_step()
        accumulate(x, y)  # at w + eps
        opt_b.second_step()
    a, b = snapshot(net_a), snapshot(net_b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-12, atol=1e-14)
    assert not torch.equal(a["body.1.weight"], Tiny().double().state_dict()["body.1.weight"])


# ------------------------------------------------------------ Lightning's order
LIGHTNING = [name for name in METHODS if name != "delta-sam"]  # its closure returns per-sample losses


def _lightning_loop(opt, net, data, accumulate):
    """Lightning 2.x automatic optimization (lightning/pytorch/loops/optimization/
    automatic.py), without Lightning: the closure runs training_step, then
    ``optimizer.zero_grad()`` only on the first batch of an accumulation window,
    then backward; accumulating batches call the closure directly, the last one
    of a window calls ``optimizer.step(closure)``. (Checked once against a real
    ``lightning.Trainer``: accumulate_grad_batches=1 trains, 2 is refused.)"""
    for i, (x, y) in enumerate(data):

        def closure(x=x, y=y, first=i % accumulate == 0):
            loss = F.cross_entropy(net(x), y)
            if first:
                opt.zero_grad()
            loss.backward()
            return loss

        if (i + 1) % accumulate:
            closure()
        else:
            opt.step(closure)


@pytest.mark.parametrize("name", LIGHTNING)
def test_lightning_order_without_accumulation_trains(name):
    net = model()
    opt = make_opt(name, net)
    _lightning_loop(opt, net, batches(4), accumulate=1)
    assert opt.num_updates == (2 if name == "m-arwp-alt" else 4)


@pytest.mark.parametrize("name", LIGHTNING)
def test_lightning_accumulate_grad_batches_is_refused(name):
    net = model()
    opt = make_opt(name, net)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        _lightning_loop(opt, net, batches(4), accumulate=2)
    assert opt.num_updates == 0

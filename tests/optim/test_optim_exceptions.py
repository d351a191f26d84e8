"""An exception inside the closure undoes the step (issue 22).

For every method, in the clean and in the perturbed pass, with and without
the storage swap, with and without a GradScaler, for an ordinary exception
(a caught CUDA out-of-memory error) and for KeyboardInterrupt: ``step``
re-raises the very same exception; in the handler the weights are w, bitwise
and on their own storage, ``model.state_dict()`` and ``opt.state_dict()`` are
what they were before the call; retrying the step and training on gives
bitwise the run in which the failed step was never attempted.
"""

from __future__ import annotations

import pytest
import torch
from optim_helpers import METHODS, batches, forbid_host_sync, make_closure, make_opt, model

from flatness import optim

STEPS = 4
RANDOM = {"rwp", "arwp", "m-rwp", "m-arwp", "m-arwp-alt", "m-rwp-alt"}
ALTERNATE = {"m-arwp-alt", "m-rwp-alt"}
EXTRA = {"m-rwp-alt": (optim.MRWP, {"sigma": 0.05, "lam": 0.5, "mix_batches": "alternate"})}


def _make_opt(name, net, **overrides):
    if name in EXTRA:
        cls, kwargs = EXTRA[name]
        kwargs = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "seed": 0, "model": net, **kwargs, **overrides}
        return cls(net.parameters(), torch.optim.SGD, **kwargs)
    return make_opt(name, net, **overrides)


def _passes(name):
    """(label, step index, call index within that step) of every pass to break."""
    if name == "delta-sam":  # 3 probes, the clean pass, the perturbed pass
        return [("probe", 1, 1), ("clean", 1, 3), ("perturbed", 1, 4)]
    if name in ("rwp", "arwp"):
        return [("perturbed", 1, 0)]
    if name in ALTERNATE:  # step 2 is the first call of a pair (clean), step 3 the second
        return [("clean", 2, 0), ("perturbed", 3, 0)]
    return [("clean", 1, 0), ("perturbed", 1, 1)]


CASES = [
    pytest.param(name, label, step, call, swap, id=f"{name}-{label}-{'swap' if swap else 'copy'}")
    for name in [*METHODS, "m-rwp-alt"]
    for label, step, call in _passes(name)
    for swap in ((True, False) if name in RANDOM else (True,))
]


class SimulatedOOM(RuntimeError):
    pass


def _tree_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _tree_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _clone(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone(v) for v in tree)
    return tree


def _model_state(net, with_bn_stats):
    """Weights (and, when asked, BatchNorm running statistics: a forward pass that
    completed before the exception recorded them, as with any optimizer)."""
    keep = lambda k: with_bn_stats or not ("running" in k or "num_batches" in k)  # noqa: E731
    return {k: v.detach().clone() for k, v in net.state_dict().items() if keep(k)}


def _run(name, swap, scaler_on, fail=None, exc_type=SimulatedOOM, before_forward=False):
    """STEPS batches; ``fail=(step, call)`` breaks that call once, checks the handler's
    view, then retries the same batch."""
    net = model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000) if scaler_on else None
    opt = _make_opt(name, net, grad_scaler=scaler)
    opt.swap_storage = swap
    for t, (x, y) in enumerate(batches(STEPS + 1)[:STEPS]):
        closure = make_closure(opt, net, x, y, scaler=scaler)
        if fail is not None and t == fail[0]:
            calls = []
            raised = exc_type("CUDA out of memory (simulated)") if exc_type is SimulatedOOM else exc_type()

            def breaking(closure=closure, calls=calls, raised=raised):
                calls.append(1)
                if len(calls) - 1 == fail[1]:
                    if before_forward:
                        raise raised
                    closure()  # forward + backward ran: .grad and the graph exist
                    raise raised
                return closure()

            weights = _model_state(net, with_bn_stats=before_forward)
            pointers = [p.data_ptr() for p in net.parameters()]
            opt_state = _clone(opt.state_dict())
            scaler_state = _clone(scaler.state_dict()) if scaler else None
            with forbid_host_sync(), pytest.raises(exc_type) as info:
                opt.step(breaking)
            assert info.value is raised  # the same exception, re-raised
            assert len(calls) == fail[1] + 1
            _tree_equal(_model_state(net, with_bn_stats=before_forward), weights, "model")
            assert [p.data_ptr() for p in net.parameters()] == pointers  # w's own storage
            assert all(p.grad is None for p in net.parameters())
            _tree_equal(opt.state_dict(), opt_state, "optimizer")  # checkpointable in the handler
            if scaler:
                _tree_equal(scaler.state_dict(), scaler_state, "scaler")
        opt.step(closure)
    return net, opt, scaler


@pytest.mark.parametrize("scaler_on", [False, True], ids=["fp32", "scaler"])
@pytest.mark.parametrize(("name", "label", "step", "call", "swap"), CASES)
def test_exception_in_a_pass_undoes_the_step(name, label, step, call, swap, scaler_on):
    net_ref, opt_ref, scaler_ref = _run(name, swap, scaler_on)
    net, opt, scaler = _run(name, swap, scaler_on, fail=(step, call))
    _tree_equal(_model_state(net, False), _model_state(net_ref, False), "model")
    _tree_equal(opt.state_dict(), opt_ref.state_dict(), "optimizer")
    if scaler_on:
        _tree_equal(scaler.state_dict(), scaler_ref.state_dict(), "scaler")


@pytest.mark.parametrize(("name", "label", "step", "call", "swap"), CASES)
def test_keyboard_interrupt_undoes_the_step(name, label, step, call, swap):
    net_ref, opt_ref, _ = _run(name, swap, False)
    net, opt, _ = _run(name, swap, False, fail=(step, call), exc_type=KeyboardInterrupt)
    _tree_equal(_model_state(net, False), _model_state(net_ref, False), "model")
    _tree_equal(opt.state_dict(), opt_ref.state_dict(), "optimizer")


@pytest.mark.parametrize("name", ["sam", "rwp", "m-arwp", "m-arwp-alt", "delta-sam"])
def test_exception_before_the_forward_leaves_batchnorm_statistics_alone_too(name):
    """Raised before the forward pass: the whole model state, BatchNorm included, is bitwise."""
    net_ref, opt_ref, _ = _run(name, True, False)
    step, call = _passes(name)[0][1:]
    net, opt, _ = _run(name, True, False, fail=(step, call), before_forward=True)
    _tree_equal(_model_state(net, True), _model_state(net_ref, True), "model")
    _tree_equal(opt.state_dict(), opt_ref.state_dict(), "optimizer")


def test_first_step_failure_leaves_no_lazy_state_behind():
    """ARWP creates its accumulators in the first perturbation: a failed first
    step must not leave them (or the noise counter) behind."""
    net = model()
    opt = make_opt("arwp", net)
    empty = _clone(opt.state_dict())
    x, y = batches(1)[0]

    def failing():
        raise SimulatedOOM("CUDA out of memory (simulated)")

    with pytest.raises(SimulatedOOM):
        opt.step(failing)
    _tree_equal(opt.state_dict(), empty)
    assert len(opt.state) == 0
    opt.step(make_closure(opt, net, x, y))
    assert opt.rng.counter == 0 and opt.num_updates == 1


# ------------------------------------------------------------- cancel_step()
MANUAL = ["sam", "asam", "rwp", "arwp", "m-rwp", "m-arwp"]


def _manual_step(opt, net, x, y, fail=False):
    """The custom-loop route; ``fail`` raises in the perturbed forward and cancels."""
    closure = make_closure(opt, net, x, y)
    opt.zero_grad()
    single = not opt.perturbation.uses_gradient and not opt.mixing
    if not single:
        closure()
    opt.first_step()
    try:
        with optim.disable_running_stats(None if single else net):
            if fail:
                raise SimulatedOOM("CUDA out of memory (simulated)")
            closure()
    except SimulatedOOM:
        opt.cancel_step()
        return False
    opt.second_step()
    return True


@pytest.mark.parametrize("swap", [True, False], ids=["swap", "copy"])
@pytest.mark.parametrize("name", MANUAL)
def test_cancel_step_abandons_a_manual_step(name, swap):
    data = batches(3)
    net_ref = model()
    opt_ref = make_opt(name, net_ref)
    opt_ref.swap_storage = swap
    for x, y in data:
        _manual_step(opt_ref, net_ref, x, y)
    net = model()
    opt = make_opt(name, net)
    opt.swap_storage = swap
    for t, (x, y) in enumerate(data):
        if t == 1:
            weights, pointers = _model_state(net, False), [p.data_ptr() for p in net.parameters()]
            state = _clone(opt.state_dict())
            assert not _manual_step(opt, net, x, y, fail=True)
            _tree_equal(_model_state(net, False), weights, "model")
            assert [p.data_ptr() for p in net.parameters()] == pointers
            _tree_equal(opt.state_dict(), state, "optimizer")  # not refused: the step is gone
        assert _manual_step(opt, net, x, y)
    _tree_equal(_model_state(net, False), _model_state(net_ref, False), "model")
    _tree_equal(opt.state_dict(), opt_ref.state_dict(), "optimizer")


def test_cancel_step_without_a_step_in_progress_does_nothing():
    net = model()
    opt = make_opt("m-arwp", net)
    x, y = batches(1)[0]
    opt.step(make_closure(opt, net, x, y))
    before, state = _model_state(net, True), _clone(opt.state_dict())
    opt.cancel_step()
    _tree_equal(_model_state(net, True), before)
    _tree_equal(opt.state_dict(), state)


def test_step_between_first_and_second_step_is_refused():
    net = model()
    opt = make_opt("rwp", net)
    opt.first_step()
    x, y = batches(1)[0]
    with pytest.raises(RuntimeError, match="between first_step\\(\\) and second_step\\(\\).*cancel_step"):
        opt.step(make_closure(opt, net, x, y))
    with pytest.raises(RuntimeError, match="called twice.*cancel_step"):
        opt.first_step()
    opt.cancel_step()
    opt.step(make_closure(opt, net, x, y))  # works again
    assert opt.num_updates == 1


@pytest.mark.parametrize(
    ("name", "swap"), [("rwp", True), ("rwp", False), ("m-arwp", False), ("asam", True), ("sam", True)]
)
def test_interrupt_inside_the_perturbation_itself_restores_w(name, swap, monkeypatch):
    """Interrupted after the parameters (copy path; ASAM's scratch T_w) or the
    buffers (swap path) were written, before the step finished perturbing."""
    import flatness.optim.perturbation as perturbation

    net = model()
    opt = make_opt(name, net, foreach=False)
    opt.swap_storage = swap
    data = batches(2)
    opt.step(make_closure(opt, net, *data[0]))
    weights, pointers = _model_state(net, False), [p.data_ptr() for p in net.parameters()]
    state = _clone(opt.state_dict())
    if name in ("sam", "asam"):

        def norm_then_interrupt(*args, **kwargs):  # the norm comes after ASAM wrote T_w into the weights
            raise KeyboardInterrupt

        monkeypatch.setattr(torch.linalg, "vector_norm", norm_then_interrupt)
    else:
        real = perturbation.filterwise_noise_into

        def noise_then_interrupt(*args, **kwargs):
            real(*args, **kwargs)
            raise KeyboardInterrupt

        monkeypatch.setattr(perturbation, "filterwise_noise_into", noise_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        opt.step(make_closure(opt, net, *data[1]))
    monkeypatch.undo()
    for k, v in _model_state(net, False).items():
        assert torch.equal(v, weights[k]), k
    assert [p.data_ptr() for p in net.parameters()] == pointers
    _tree_equal(opt.state_dict(), state, "optimizer")
    opt.step(make_closure(opt, net, *data[1]))  # and the next step works


def test_a_failed_first_step_removes_the_keys_it_added_to_existing_state():
    """Code that reads ``opt.state[p]`` creates empty entries; a failed first ARWP
    step must take its accumulators out of them again."""
    net = model()
    opt = make_opt("arwp", net)
    for p in net.parameters():
        assert opt.state[p] == {}

    def failing():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        opt.step(failing)
    assert all(opt.state[p] == {} for p in net.parameters())

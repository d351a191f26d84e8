"""Small problems and factories shared by the optim tests."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flatness import optim

# name -> (class, method kwargs). Hyperparameters are large enough that a bug
# in the perturbation shows up, small enough that training still works.
METHODS: dict[str, tuple[type, dict]] = {
    "sam": (optim.SAM, {"rho": 0.05}),
    "asam": (optim.ASAM, {"rho": 0.5, "adaptive_eta": 0.01}),
    "delta-sam": (optim.DeltaSAM, {"rho": 0.05, "temperature": 0.5}),
    "rwp": (optim.RWP, {"sigma": 0.05}),
    "arwp": (optim.ARWP, {"sigma": 0.05, "eta": 0.5, "beta": 0.9}),
    "m-rwp": (optim.MRWP, {"sigma": 0.05, "lam": 0.5}),
    "m-arwp": (optim.MARWP, {"sigma": 0.05, "lam": 0.5, "eta": 0.5, "beta": 0.9}),
    "m-arwp-alt": (
        optim.MARWP,
        {"sigma": 0.05, "lam": 0.5, "eta": 0.5, "beta": 0.9, "mix_batches": "alternate"},
    ),
}


def data(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x[:, 0, :3, :3].sum((1, 2)) > 0).long() + (x[:, 0, 3:, 3:].sum((1, 2)) > 0).long()
    return x, y


def batches(n_batches: int, size: int = 16, seed: int = 0):
    x, y = data(n_batches * size, seed)
    return [(x[i * size : (i + 1) * size], y[i * size : (i + 1) * size]) for i in range(n_batches)]


class ConvNet(nn.Module):
    """4-D, 2-D, 1-D parameters and BatchNorm buffers, in a few hundred weights."""

    def __init__(self, unused: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.unused = nn.Linear(3, 3) if unused else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def model(seed: int = 1, unused: bool = False) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(unused=unused)


def make_closure(
    opt: torch.optim.Optimizer,
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    scaler: torch.amp.GradScaler | None = None,
    autocast: bool = False,
) -> Callable[[], torch.Tensor]:
    """The closure a trainer writes, per the contract of ``opt``."""

    def forward() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net(x)
        return F.cross_entropy(out.float(), y, reduction="none")

    if getattr(opt, "per_sample_closure", False):
        return forward

    def closure() -> torch.Tensor:
        loss = forward().mean()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()

    return closure


def make_opt(name: str, net: nn.Module, **overrides) -> optim.PerturbedOptimizer:
    cls, kwargs = METHODS[name]
    kwargs = {**kwargs, **overrides}
    kwargs.setdefault("lr", 0.1)
    kwargs.setdefault("momentum", 0.9)
    kwargs.setdefault("weight_decay", 1e-3)
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("model", net)
    return cls(net.parameters(), torch.optim.SGD, **kwargs)


def train(opt, net, data_batches, **closure_kwargs) -> list[torch.Tensor]:
    return [opt.step(make_closure(opt, net, x, y, **closure_kwargs)) for x, y in data_batches]


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs: max |diff| {(a[k].float() - b[k].float()).abs().max()}"


def roundtrip(obj) -> object:
    """Save and load with weights_only=True, as a checkpoint would."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


_HOST_SYNC = ["item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"]


_ORIGINALS = {name: getattr(torch.Tensor, name) for name in _HOST_SYNC}


@contextlib.contextmanager
def allow_host_sync():
    """Inside ``forbid_host_sync``, lift the guard for the duration of this block."""
    guarded = {name: getattr(torch.Tensor, name) for name in _HOST_SYNC}
    for name, original in _ORIGINALS.items():
        setattr(torch.Tensor, name, original)
    try:
        yield
    finally:
        for name, method in guarded.items():
            setattr(torch.Tensor, name, method)


@contextlib.contextmanager
def forbid_host_sync():
    """Inside the block, Tensor methods that synchronise with the host raise."""
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_SYNC}

    def guard(name):
        def raising(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name}() called inside step()")

        return raising

    for name in _HOST_SYNC:
        setattr(torch.Tensor, name, guard(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)

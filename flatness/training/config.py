"""All settings of a training run, resolved and JSON-serialisable (``config.json``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from flatness.errors import FlatnessError

SCHEDULES = ("cosine", "step", "constant")
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch


@dataclass
class TrainConfig:
    """Settings of ``flatness train``; every field lands in ``config.json``.

    Method hyperparameters (``sigma``, ``lam``, ...) are used by the methods
    that take them and recorded for all.
    """

    model: str = "cnn1d"
    data: str = "mnist1d"
    data_dir: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "sgd"
    epochs: int = 60
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    seed: int = 0
    cutout: int = 0
    augment: bool = True
    # method hyperparameters (DESIGN.md section 3)
    rho: float = 0.05
    adaptive_eta: float = 0.01
    sigma: float = 0.01
    sigma_inc: float = 0.0
    lam: float = 0.5
    eta: float = 0.1
    beta: float = 0.99
    temperature: float = 1.0
    mix_batches: str = "same"
    parallel_roles: bool = False
    # bookkeeping
    save_every: int = 0
    keep_epochs: bool = True

    def validate(self) -> None:
        """Check values; raise FlatnessError naming the bad one."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise FlatnessError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        positive_ints = {"epochs": self.epochs, "batch_size": self.batch_size}
        for name, value in positive_ints.items():
            if not isinstance(value, int) or value <= 0:
                raise FlatnessError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if not 0 < self.lr <= FLOAT32_MAX:
            raise FlatnessError(f"--lr must be positive and at most {FLOAT32_MAX:.3g} (float32 weights), got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise FlatnessError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise FlatnessError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise FlatnessError(f"unknown --schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        hyper_checks = [
            ("sigma", self.sigma >= 0, "must be >= 0"),
            ("lam", 0 <= self.lam <= 1, "must be in [0, 1]"),
            ("beta", 0 <= self.beta < 1, "must be in [0, 1)"),
            ("eta", self.eta >= 0, "must be >= 0"),
            ("rho", self.rho > 0, "must be positive"),
            ("adaptive_eta", self.adaptive_eta >= 0, "must be >= 0"),
            ("temperature", self.temperature > 0, "must be positive"),
        ]
        for name, ok, rule in hyper_checks:
            if not ok:
                raise FlatnessError(f"--{name.replace('_', '-')} {rule}, got {getattr(self, name)}")
        if self.mix_batches not in ("same", "alternate"):
            raise FlatnessError(f"unknown --mix-batches {self.mix_batches!r}; expected 'same' or 'alternate'")
        if self.save_every < 0:
            raise FlatnessError(f"--save-every must be >= 0, got {self.save_every}")
        if self.cutout < 0:
            raise FlatnessError(f"--cutout must be >= 0, got {self.cutout}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Settings from a dict (``config.json``); a value of the wrong type is a FlatnessError.

        Unknown keys are ignored; ints are accepted where floats are expected.
        """
        defaults = cls()
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            value, default = d[f.name], getattr(defaults, f.name)
            if isinstance(default, float) and type(value) is int:
                value = float(value)
            if isinstance(default, tuple) and isinstance(value, list):
                value = tuple(value)
            expected = (str, type(None)) if f.name == "data_dir" else type(default)
            if not isinstance(value, expected) or (isinstance(value, bool) and not isinstance(default, bool)):
                raise FlatnessError(f"setting {f.name!r} must be a {type(default).__name__}, got {value!r}")
            kwargs[f.name] = value
        return cls(**kwargs)

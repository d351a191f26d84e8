"""All settings of a training run, resolved and JSON-serialisable (``config.json``).

The comparison protocol (issue 13): ``epochs`` counts epochs' worth of
parameter UPDATES, the same for every method. A method that makes one
update per batch (SGD, SAM, RWP, same-batch m-(A)RWP) reads ``epochs`` data
epochs; the alternate m-(A)RWP scheme (one update per two batches, as in
the official nblt/mARWP script, which doubles its epochs) reads
``2 * epochs`` data epochs. The LR schedule runs over the updates, so every
method sees the same learning rate at the same update.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from flatness.errors import FlatnessError

SCHEDULES = ("cosine", "step", "constant")
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch
INT_MAX = 2**63 - 1  # torch seeds and tensor sizes are signed 64-bit

#: Official recipe defaults of the radius per method (ASAM: Kwon et al. 2021, rho 0.5 with eta 0.01).
RHO_DEFAULTS = {"asam": 0.5}
RHO_DEFAULT = 0.05

#: Keys ``config.json`` holds beside the settings: derived from them, never read back as settings.
DERIVED_KEYS = ("updates", "data_epochs", "grad_evals_per_update")
#: Records ``config.json`` holds beside the settings: the run's fingerprint and its schedule replans.
RECORD_KEYS = (*DERIVED_KEYS, "fingerprint", "schedule_replans")

_INT_RULES = {  # field -> (minimum, what the flag means)
    "epochs": (1, "a positive integer"),
    "batch_size": (1, "a positive integer"),
    "seed": (0, "an integer in [0, 2**63 - 1]"),
    "cutout": (0, "an integer >= 0"),
    "save_every": (0, "an integer >= 0 (0: epoch ends only)"),
    "val_split": (0, "an integer >= 0 (0: no validation split)"),
    "track_curvature": (0, "an integer >= 0 (0: off)"),
    "track_samples": (1, "a positive integer"),
    "track_products": (0, "an integer >= 0 (0: until converged, or the budget's default)"),
}

#: The budget of ``--track-curvature`` without N: at most 5 % extra over untracked training.
TRACK_BUDGET_DEFAULT = 0.05


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of ``flatness train``; every field lands in ``config.json``.

    Validated once, on construction (one-line :class:`FlatnessError` naming
    the flag). Method hyperparameters (``sigma``, ``lam``, ...) are used by
    the methods that take them and recorded for all. ``rho=None`` means the
    method's official default (0.5 for ASAM, 0.05 otherwise) and is resolved
    here, so ``config.json`` holds the value used.

    Attributes:
        epochs: epochs' worth of parameter updates (see the module docstring).
        val_split: training samples held out (deterministically by ``seed``)
            as a validation split; excluded from training.
        incstd: the official ``--incstd``: sigma rises by a cosine from
            ``weight_decay`` to ``sigma`` over the run (RWP family).
        track_curvature: every N updates, lambda_max on the first
            ``track_samples`` training samples (eval mode) into ``curvature.jsonl``
            (with ``track_budget``: the least interval).
        track_budget: track within this extra cost over untracked training
            (fraction, e.g. 0.05); the interval and the products per point are
            chosen once from timings (flatness/training/tracking.py). 0: no budget.
        track_products: most Hessian-vector products per tracked point (0:
            until converged without a budget, 5 with one); each point records its error bound.
    """

    model: str = "cnn1d"
    data: str = "mnist1d"
    data_dir: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    loss: str = "cross_entropy"
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
    val_split: int = 0
    # method hyperparameters (DESIGN.md section 3; defaults of the official recipes)
    rho: float | None = None
    adaptive_eta: float = 0.01
    sigma: float = 0.015
    sigma_inc: float = 0.0
    incstd: bool = False
    lam: float = 0.5
    eta: float = 0.1
    beta: float = 0.99
    temperature: float = 1.0
    mix_batches: str = "same"
    parallel_roles: bool = False
    # bookkeeping
    save_every: int = 0
    keep_epochs: bool = True
    track_curvature: int = 0
    track_trace: bool = False
    track_samples: int = 256
    track_budget: float = 0.0
    track_products: int = 0

    def __post_init__(self) -> None:
        if self.rho is None:
            object.__setattr__(self, "rho", RHO_DEFAULTS.get(self.method, RHO_DEFAULT))
        object.__setattr__(self, "milestones", tuple(self.milestones))
        self._check_types()
        self._check_ranges()
        self._check_choices()

    # ------------------------------------------------------------------ validation
    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise FlatnessError(f"{_flag(f.name)} must be a finite number, got {value}")
        for name, (low, rule) in _INT_RULES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= INT_MAX:
                raise FlatnessError(f"{_flag(name)} must be {rule}, got {value}")

    def _check_ranges(self) -> None:
        if not 0 < self.lr <= FLOAT32_MAX:
            raise FlatnessError(f"--lr must be positive and at most {FLOAT32_MAX:.3g} (float32 weights), got {self.lr}")
        rules = [
            ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("sigma", self.sigma >= 0, "must be >= 0"),
            ("sigma_inc", self.sigma_inc >= -1, "must be >= -1"),
            ("lam", 0 <= self.lam <= 1, "must be in [0, 1]"),
            ("beta", 0 <= self.beta < 1, "must be in [0, 1)"),
            ("eta", self.eta >= 0, "must be >= 0"),
            ("rho", self.rho > 0, "must be positive"),
            ("adaptive_eta", self.adaptive_eta >= 0, "must be >= 0"),
            ("temperature", self.temperature > 0, "must be positive"),
            ("track_budget", 0 <= self.track_budget <= 100, "must be in [0, 100] (a fraction of the training cost; 0: no budget)"),
        ]
        for name, ok, rule in rules:
            if not ok:
                raise FlatnessError(f"{_flag(name)} {rule}, got {getattr(self, name)}")

    def _check_choices(self) -> None:
        if self.schedule not in SCHEDULES:
            raise FlatnessError(f"unknown --schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if self.mix_batches not in ("same", "alternate"):
            raise FlatnessError(f"unknown --mix-batches {self.mix_batches!r}; expected 'same' or 'alternate'")
        if self.incstd and self.sigma_inc != 0.0:
            raise FlatnessError("--incstd and --sigma-inc are two sigma schedules; pass one of them")
        if self.incstd and self.weight_decay <= 0:
            raise FlatnessError("--incstd starts sigma at --weight-decay (the official schedule), so it needs --weight-decay > 0")
        if self.method == "delta-sam" and self.loss != "cross_entropy":
            raise FlatnessError(f"delta-sam weighs per-sample cross-entropy losses; it takes --loss cross_entropy, not {self.loss!r}")
        if self.track_trace and not self.tracking:
            raise FlatnessError("--track-trace needs --track-curvature (or --track-budget)")
        if self.track_products and not self.tracking:
            raise FlatnessError("--track-products needs --track-curvature (or --track-budget)")

    @property
    def tracking(self) -> bool:
        """Curvature is tracked: every ``track_curvature`` updates, or within ``track_budget``."""
        return self.track_curvature > 0 or self.track_budget > 0

    # ------------------------------------------------------------------ the protocol
    @property
    def alternate(self) -> bool:
        """One update per two batches (the alternate m-(A)RWP scheme)."""
        return self.method in ("m-rwp", "m-arwp") and self.mix_batches == "alternate" and not self.parallel_roles

    @property
    def batches_per_update(self) -> int:
        return 2 if self.alternate else 1

    @property
    def data_epochs(self) -> int:
        """Passes over the training data: ``epochs`` times batches per update."""
        return self.epochs * self.batches_per_update

    def protocol(self, batches_per_epoch: int) -> dict[str, int]:
        """The derived counts written beside the settings in ``config.json``."""
        from flatness.training.methods import get_method

        return {
            "updates": self.epochs * batches_per_epoch,
            "data_epochs": self.data_epochs,
            "grad_evals_per_update": get_method(self.method).grad_evals,
        }

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Settings from a dict (``config.json``); validated like the constructor.

        Raises:
            FlatnessError: an unknown key (named), or a value of the wrong type.
                Ints are accepted where floats are expected; the derived keys
                (``updates``, ``data_epochs``, ``grad_evals_per_update``) and the
                records (``fingerprint``, ``schedule_replans``) are skipped.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in RECORD_KEYS)
        if unknown:
            raise FlatnessError(f"unknown setting {unknown[0]!r} (known: {', '.join(sorted(names))})")
        defaults = cls()
        kwargs = {name: _typed(name, d[name], getattr(defaults, name)) for name in names if name in d}
        return cls(**kwargs)


def _typed(name: str, value: Any, default: Any) -> Any:
    """``value`` converted to the type of ``default`` where lossless; a FlatnessError otherwise."""
    if isinstance(default, float) and type(value) is int:
        value = float(value)
    if isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)
    if name == "data_dir":
        expected: tuple[type, ...] = (str, type(None))
    elif name == "rho":
        expected = (float, int, type(None))
    else:
        expected = (type(default),)
    if not isinstance(value, expected) or (isinstance(value, bool) and not isinstance(default, bool)):
        raise FlatnessError(f"setting {name!r} must be a {type(default).__name__}, got {value!r}")
    return value

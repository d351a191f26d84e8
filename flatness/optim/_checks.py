"""Hyperparameter validation shared by the optimizers in :mod:`flatness.optim`.

Every check raises ``ValueError`` naming the offending value (``TypeError`` for
a value of the wrong kind), so that ``flatness train`` can turn it into a
one-line error.
"""

from __future__ import annotations

import math

import torch


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(name: str, value: object) -> float:
    if not _is_number(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value):  # type: ignore[arg-type]
        raise ValueError(f"Invalid {name} value: {value}")
    return float(value)  # type: ignore[arg-type]


def check_nonnegative(name: str, value: object) -> float:
    number = check_number(name, value)
    if number < 0.0:
        raise ValueError(f"Invalid {name} value: {value} (expected {name} >= 0)")
    return number


def check_positive(name: str, value: object) -> float:
    number = check_number(name, value)
    if number <= 0.0:
        raise ValueError(f"Invalid {name} value: {value} (expected {name} > 0)")
    return number


def check_unit_closed(name: str, value: object) -> float:
    number = check_number(name, value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"Invalid {name} value: {value} (expected 0 <= {name} <= 1)")
    return number


def check_unit_half_open(name: str, value: object) -> float:
    number = check_number(name, value)
    if not 0.0 <= number < 1.0:
        raise ValueError(f"Invalid {name} value: {value} (expected 0 <= {name} < 1)")
    return number


def check_positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"Invalid {name} value: {value} (expected {name} >= 1)")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        expected = " or ".join(repr(c) for c in choices)
        raise ValueError(f"Unknown {name} {value!r}; expected {expected}")
    return value  # type: ignore[return-value]


def check_foreach(value: object) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"foreach must be True, False or None, got {value!r}")
    return value


def check_base_optimizer(base_optimizer: object) -> None:
    if isinstance(base_optimizer, torch.optim.Optimizer):
        raise TypeError(
            "base_optimizer must be an optimizer class such as torch.optim.SGD, "
            f"not an instance ({type(base_optimizer).__name__} object)"
        )
    if not callable(base_optimizer):
        raise TypeError(
            f"base_optimizer must be a torch.optim.Optimizer subclass, got {base_optimizer!r}"
        )

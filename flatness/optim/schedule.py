r"""CosineInc: the cosine-increasing noise schedule of Li et al., TMLR 2024.

.. math::

    \sigma_t = \sigma_0\Big(1 + \text{inc}\,\frac{1 - \cos(\pi t / T)}{2}\Big),
    \qquad 0 \le t \le T,

rising from :math:`\sigma_0` to :math:`\sigma_0(1 + \text{inc})`; after
:math:`T` it stays there (the official code lets the cosine turn back down,
which never happens when :math:`T` is the length of the run).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._checks import check_number, check_positive_int


class CosineInc:
    """Sets ``group["sigma"]`` of an RWP-family optimizer, like an LR scheduler.

    Call :meth:`step` once per unit of ``total_steps`` (the official recipe:
    once per batch, with ``total_steps = epochs * batches_per_epoch``). Works
    with any optimizer whose param groups hold ``sigma`` (:class:`~flatness.optim.RWP`,
    :class:`~flatness.optim.ARWP`, :class:`~flatness.optim.MRWP`, :class:`~flatness.optim.MARWP`, the
    parallel ones). On construction each group's current ``sigma`` is recorded
    as ``group["initial_sigma"]`` (kept if already present, e.g. on resume) and
    becomes its :math:`\\sigma_0`.

    Args:
        optimizer: optimizer with ``sigma`` in its param groups.
        total_steps: :math:`T` (>= 1).
        inc: relative increase at :math:`T` (>= -1); the official ARWP recipe
            uses ``inc=10`` from ``sigma=0.001``.
        last_step: index of the last step taken (0 for a fresh run).

    Raises:
        ValueError: ``total_steps < 1``, ``inc < -1``, or a group without ``sigma``.

    Example:
        >>> import torch
        >>> from optim import ARWP
        >>> net = torch.nn.Linear(3, 1)
        >>> opt = ARWP(net.parameters(), torch.optim.SGD, lr=0.1, sigma=0.001)
        >>> sched = CosineInc(opt, total_steps=100, inc=10)
        >>> for _ in range(100):
        ...     sched.step()
        >>> round(opt.param_groups[0]["sigma"], 6)
        0.011
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        inc: float,
        *,
        last_step: int = 0,
    ) -> None:
        check_positive_int("total_steps", total_steps)
        inc = check_number("inc", inc)
        if inc < -1.0:
            raise ValueError(f"Invalid inc value: {inc} (expected inc >= -1)")
        for i, group in enumerate(optimizer.param_groups):
            if "sigma" not in group:
                raise ValueError(
                    f"param group {i} of {type(optimizer).__name__} has no 'sigma'; "
                    "CosineInc schedules RWP-family optimizers"
                )
            group.setdefault("initial_sigma", group["sigma"])
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.inc = inc
        self.last_step = last_step
        self._apply()

    def factor(self, t: int) -> float:
        """The multiplier of :math:`\\sigma_0` at step ``t``."""
        t = min(max(t, 0), self.total_steps)
        return 1.0 + self.inc * (1.0 - math.cos(math.pi * t / self.total_steps)) / 2.0

    def get_sigma(self) -> list[float]:
        """Current sigma of every param group."""
        return [group["initial_sigma"] * self.factor(self.last_step) for group in self.optimizer.param_groups]

    def _apply(self) -> None:
        for group, sigma in zip(self.optimizer.param_groups, self.get_sigma()):
            group["sigma"] = sigma

    def step(self) -> None:
        """Advance one step and write the new sigma into the param groups."""
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "inc": self.inc, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_steps = int(state_dict["total_steps"])
        self.inc = float(state_dict["inc"])
        self.last_step = int(state_dict["last_step"])
        self._apply()

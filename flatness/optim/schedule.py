r"""Schedules: the cosine-increasing noise schedule of Li et al., TMLR 2024
(:class:`CosineInc`), and :class:`StepOnUpdate`, which steps a learning-rate
scheduler once per weight update instead of once per ``step`` call.

CosineInc:

.. math::

    \sigma_t = \sigma_0\Big(1 + \text{inc}\,\frac{1 - \cos(\pi t / T)}{2}\Big),
    \qquad 0 \le t \le T,

rising from :math:`\sigma_0` to :math:`\sigma_0(1 + \text{inc})`; after
:math:`T` it stays there (the official code lets the cosine turn back down,
which never happens when :math:`T` is the length of the run).

The formula is the official one (nblt/mARWP, class ``CosineInc`` in both
training scripts, stepped once per batch); the scripts parameterise it
differently:

* ``train_rwp_cos.py`` (single-pass ARWP): always on, from ``--std`` to
  ``std * (1 + --inc)`` (``--inc`` default 15) over ``epochs * len(loader)``
  batches. That is the plain constructor, ``CosineInc(opt, total_steps, inc)``,
  starting at the optimizer's ``sigma``.
* ``train_marwp.py`` (m-ARWP, alternate batches), flag ``--incstd``: ``--sigma``
  is the *final* value and the start is the *weight decay*
  (:math:`\sigma_0 = \text{wd}`, :math:`\text{inc} = \sigma/\text{wd} - 1`), over
  all batches of the doubled epoch count. :meth:`CosineInc.from_range`
  (``start=weight_decay, end=sigma``) builds exactly that.
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
        >>> from flatness.optim import ARWP
        >>> net = torch.nn.Linear(3, 1)
        >>> opt = ARWP(net.parameters(), torch.optim.SGD, lr=0.1, sigma=0.001)
        >>> sched = CosineInc(opt, total_steps=100, inc=10)
        >>> for _ in range(100):
        ...     _ = sched.step()
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

    @classmethod
    def from_range(
        cls,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        *,
        start: float,
        end: float,
        last_step: int = 0,
    ) -> CosineInc:
        """The schedule from ``start`` at step 0 to ``end`` at ``total_steps``, in every group.

        This is the official ``--incstd`` form (nblt/mARWP ``train_marwp.py``):
        there ``--sigma`` is the *final* std and the schedule starts at the
        weight decay, ``CosineInc(weight_decay, epochs, len(train_loader),
        sigma / weight_decay - 1)``, stepped once per batch over the doubled
        epoch count. The same schedule here::

            CosineInc.from_range(opt, total_steps=2 * epochs * len(loader),
                                 start=weight_decay, end=sigma)

        stepped once per ``opt.step`` call (not per update). The plain
        constructor instead starts at each group's current ``sigma`` and ends at
        ``sigma * (1 + inc)``.

        Raises:
            ValueError: ``start <= 0`` or ``end < 0`` (or as the constructor).
        """
        start, end = check_number("start", start), check_number("end", end)
        if start <= 0.0:
            raise ValueError(f"Invalid start value: {start} (expected start > 0)")
        if end < 0.0:
            raise ValueError(f"Invalid end value: {end} (expected end >= 0)")
        for group in optimizer.param_groups:
            group["initial_sigma"] = start
        return cls(optimizer, total_steps, end / start - 1.0, last_step=last_step)

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


class StepOnUpdate:
    """Steps a per-update LR scheduler only after calls that updated the weights.

    With ``mix_batches="alternate"`` an m-(A)RWP optimizer updates the weights
    on every *second* ``step(closure)`` call (the first of a pair only stashes
    the clean gradient), so ``scheduler.step()`` after every call would decay
    the learning rate twice per update. Wrapping the scheduler makes the usual
    loop correct for every optimizer of :mod:`flatness.optim`: the wrapper reads
    the optimizer's ``last_step_updated`` flag (a Python bool, no host sync)
    and passes the call on only when it is True. Plain torch optimizers have
    no such flag and count every call as an update.

    Args:
        scheduler: any object with ``step()`` (``torch.optim.lr_scheduler``,
            :class:`CosineInc` if it should advance per update, ...).
        optimizer: the optimizer whose updates count.

    Example:
        >>> import torch
        >>> from flatness.optim import MARWP
        >>> net = torch.nn.Linear(3, 1)
        >>> opt = MARWP(net.parameters(), torch.optim.SGD, lr=1.0, mix_batches="alternate")
        >>> sched = StepOnUpdate(torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5), opt)
        >>> def closure():
        ...     loss = net(torch.ones(2, 3)).sum()
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(4):  # 4 calls, 2 updates
        ...     _ = opt.step(closure)
        ...     _ = sched.step()
        >>> opt.param_groups[0]["lr"], sched.num_steps
        (0.25, 2)
    """

    def __init__(self, scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
        if not callable(getattr(scheduler, "step", None)):
            raise TypeError(f"scheduler must have a step() method, got {type(scheduler).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.scheduler = scheduler
        self.optimizer = optimizer
        self.num_steps = 0

    def step(self) -> bool:
        """Step the scheduler if the optimizer's last call updated the weights.

        Returns:
            Whether the wrapped scheduler was stepped.
        """
        if not getattr(self.optimizer, "last_step_updated", True):
            return False
        self.scheduler.step()
        self.num_steps += 1
        return True

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "num_steps": self.num_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict["scheduler"])
        self.num_steps = int(state_dict["num_steps"])

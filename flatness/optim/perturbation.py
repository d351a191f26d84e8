r"""How the perturbed point :math:`w + \epsilon` is made - the pluggable piece.

SAM, ASAM, RWP and ARWP share every line of bookkeeping (backups, gradient
stashing, BatchNorm handling, the base-optimizer step, checkpointing; see
:mod:`flatness.optim.wrapper`) and differ only in :math:`\epsilon`:

* :class:`GradientPerturbation` - SAM (Foret et al., ICLR 2021, "Sharpness-Aware
  Minimization for Efficiently Improving Generalization") and ASAM (Kwon et
  al., ICML 2021, "ASAM: Adaptive Sharpness-Aware Minimization for
  Scale-Invariant Learning of Deep Neural Networks"):

  .. math::

      \epsilon = \rho\, \frac{T_w^2\, g}{\lVert T_w\, g\rVert + 10^{-12}},
      \qquad T_w = |w| + \eta_{\text{adaptive}} \ (\text{ASAM}),\quad T_w = 1\ (\text{SAM}),

  with the norm taken over all parameters of all groups and :math:`g` the
  gradient at :math:`w`.
* :class:`RandomPerturbation` - RWP / ARWP (Li et al., TMLR 2024), filter-wise
  Gaussian noise, see :mod:`flatness.optim.noise`.

The wrapper hands a perturbation backups that already hold an exact copy of
:math:`w` (it copies them *before* calling :meth:`Perturbation.perturb_`); the
perturbation may use the parameters as scratch space and leaves
:math:`w + \epsilon` in them; the wrapper restores :math:`w` by copying the
backups back, so the round trip is exact - also when the perturbation is
interrupted half way (an out-of-memory error, a ``KeyboardInterrupt``). A
perturbation with ``can_swap`` (the random ones) can instead leave the
parameters alone and write :math:`w + \epsilon` into the backups
(``Slice.swap``); the wrapper then swaps the storages, so :math:`w` is never
copied and is restored exactly by swapping back (``Slice.originals``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .noise import filterwise_noise_into, fisher_like, update_fisher_
from .rng import NoiseGenerators


@dataclass
class Slice:
    """The tensors of one parameter group that take part in a perturbation."""

    group: dict[str, Any]
    params: list[Tensor]
    backups: list[Tensor]
    grads: list[Tensor]
    states: list[dict[str, Any]]
    foreach: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    #: Write w + eps into ``backups`` and leave ``params`` at w; the wrapper then
    #: swaps the storages (only for perturbations with ``can_swap``).
    swap: bool = False
    #: With ``swap``: the parameters' own storages (w), one per parameter swapped
    #: so far, in ``params`` order; swapping back restores exactly these.
    originals: list[Tensor] = field(default_factory=list)


class Perturbation:
    """Base class of the pluggable perturbations.

    Attributes:
        uses_gradient: True when :math:`\\epsilon` is computed from the gradient at
            :math:`w` (SAM, ASAM), so the method needs a clean pass first and only
            parameters with a gradient are perturbed. False for noise (RWP),
            which perturbs every parameter that requires a gradient.
    """

    uses_gradient: ClassVar[bool] = False
    #: Can write :math:`w+\epsilon` into the backups instead (``Slice.swap``).
    can_swap: ClassVar[bool] = False

    def perturb_(self, slices: Sequence[Slice], rng: NoiseGenerators) -> None:
        """Leave :math:`w+\\epsilon` in ``slice.params`` (``slice.swap``: in ``slice.backups``).

        Without ``swap`` the backups already hold an exact copy of :math:`w` on
        entry and must not be changed; the parameters may serve as scratch
        space. With ``swap`` the parameters are read only.
        """
        raise NotImplementedError

    def observe_(self, slices: Sequence[Slice], inv_scale: Tensor | None) -> None:
        """Look at the gradients of the perturbed pass (``slice.grads``); default: nothing."""


class GradientPerturbation(Perturbation):
    """SAM / ASAM ascent step; reads ``rho`` and (ASAM) ``adaptive_eta`` from each group.

    Args:
        adaptive: ASAM's element-wise scaling :math:`T_w = |w| + \\eta`. A group
            can switch it off with ``"adaptive": False`` (:math:`T_w = 1`, e.g. for
            biases, as ASAM's official code scales only parameters named
            ``weight``).
        eps: added to the norm in the denominator.

    The gradients are consumed: they are overwritten with :math:`\\epsilon`.
    """

    uses_gradient = True

    def __init__(self, adaptive: bool = False, eps: float = 1e-12) -> None:
        self.adaptive = adaptive
        self.eps = eps

    def _is_adaptive(self, group: dict[str, Any]) -> bool:
        return self.adaptive and group.get("adaptive", True)

    def perturb_(self, slices: Sequence[Slice], rng: NoiseGenerators) -> None:
        slices = [s for s in slices if s.params]
        if not slices:
            return
        # The backups hold w; the parameters double as scratch space for T_w.
        for s in slices:
            if not self._is_adaptive(s.group):
                continue
            eta = s.group["adaptive_eta"]
            if s.foreach:
                torch._foreach_abs_(s.params)
                torch._foreach_add_(s.params, eta)
                torch._foreach_mul_(s.grads, s.params)
            else:
                for p, g in zip(s.params, s.grads):
                    p.abs_().add_(eta)
                    g.mul_(p)
        device = slices[0].params[0].device
        norms: list[Tensor] = []
        for s in slices:
            if s.foreach:
                norms.extend(torch._foreach_norm(s.grads))
            else:
                norms.extend(torch.linalg.vector_norm(g) for g in s.grads)
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
        for s in slices:
            scale = s.group["rho"] / (total + self.eps)
            adaptive = self._is_adaptive(s.group)
            if s.foreach:
                if adaptive:
                    torch._foreach_mul_(s.grads, s.params)
                    torch._foreach_copy_(s.params, s.backups)
                torch._foreach_mul_(s.grads, scale)
                torch._foreach_add_(s.params, s.grads)
            else:
                for p, b, g in zip(s.params, s.backups, s.grads):
                    if adaptive:
                        g.mul_(p)
                        p.copy_(b)
                    g.mul_(scale.to(g.device))
                    p.add_(g)


class RandomPerturbation(Perturbation):
    """RWP / ARWP filter-wise Gaussian noise; reads ``sigma`` (and ``eta``, ``beta``).

    Args:
        adaptive: ARWP. Keeps a per-row accumulator ``state["fisher"]`` of the
            squared gradients of the perturbed pass and divides the noise of row
            ``i`` by :math:`\\sqrt{1 + \\eta F_i}`.
    """

    uses_gradient = False
    can_swap = True

    def __init__(self, adaptive: bool = False) -> None:
        self.adaptive = adaptive

    def _fisher(self, s: Slice) -> list[Tensor]:
        fisher = []
        for p, state in zip(s.params, s.states):
            if "fisher" not in state:
                state["fisher"] = fisher_like(p)
            fisher.append(state["fisher"])
        return fisher

    def perturb_(self, slices: Sequence[Slice], rng: NoiseGenerators) -> None:
        for s in slices:
            if not s.params:
                continue
            fisher = self._fisher(s) if self.adaptive else None
            # swap: params (w) -> backups (w + eps); copy: backups (w) -> params.
            source, target = (s.params, s.backups) if s.swap else (s.backups, s.params)
            filterwise_noise_into(
                source,
                target,
                sigma=s.group["sigma"],
                fisher=fisher,
                eta=s.group["eta"] if self.adaptive else 0.0,
                generator=rng.get,
                foreach=s.foreach,
            )

    def observe_(self, slices: Sequence[Slice], inv_scale: Tensor | None) -> None:
        if not self.adaptive:
            return
        for s in slices:
            if not s.params:
                continue
            update_fisher_(
                self._fisher(s),
                s.grads,
                beta=s.group["beta"],
                inv_scale=inv_scale,
                foreach=s.foreach,
            )

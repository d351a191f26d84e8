r"""SAM and ASAM as wrappers of a base optimizer.

* Foret et al., ICLR 2021, "Sharpness-Aware Minimization for Efficiently
  Improving Generalization".
* Kwon et al., ICML 2021, "ASAM: Adaptive Sharpness-Aware Minimization for
  Scale-Invariant Learning of Deep Neural Networks".

.. math::

    \epsilon = \rho\,\frac{T_w^2\, \nabla L_B(w)}{\lVert T_w \nabla L_B(w)\rVert + 10^{-12}},
    \qquad w \leftarrow \text{base\_step}\big(w,\ \nabla L_B(w + \epsilon)\big),

with :math:`T_w = 1` (SAM) or :math:`T_w = |w| + \eta_{\text{adaptive}}` (ASAM),
both passes on the same batch :math:`B`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._checks import check_choice, check_nonnegative, check_positive
from .perturbation import GradientPerturbation
from .wrapper import ParamsT, PerturbedOptimizer


class SAM(PerturbedOptimizer):
    r"""Sharpness-Aware Minimization (Foret et al., 2021).

    Two forward-backward passes per batch: the gradient at :math:`w` gives
    :math:`\epsilon = \rho g / (\lVert g\rVert + 10^{-12})` (norm over all
    parameters with a gradient), the gradient at :math:`w + \epsilon` is
    applied at :math:`w` by the base optimizer. Parameters whose gradient is
    ``None`` are not perturbed.

    BatchNorm: pass ``model=`` and the second pass runs under
    :func:`~flatness.optim.disable_running_stats`, so running statistics only see the
    first (clean) pass. Without ``model`` they are updated twice.

    Args:
        params: parameters or parameter groups.
        base_optimizer: optimizer class, e.g. ``torch.optim.SGD``.
        rho: radius of the perturbation (> 0).
        model: network whose BatchNorm layers the second pass leaves alone.
        seed, foreach, grad_scaler: see :class:`~flatness.optim.wrapper.PerturbedOptimizer`.
        **base_kwargs: base optimizer hyperparameters (``lr``, ``momentum``, ...).

    Raises:
        ValueError: ``rho <= 0``.

    Closure contract: ``closure()`` runs forward and backward on the current
    batch and returns the loss; it is called twice per ``step``; the optimizer
    zeroes gradients before each call, and refuses gradients accumulated before
    ``step`` (accumulate through ``first_step()`` / ``second_step()``, see
    :mod:`flatness.optim.wrapper`). With ``grad_scaler`` it must call
    ``grad_scaler.scale(loss).backward()``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.05)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> def closure():
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
    """

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[torch.optim.Optimizer],
        *,
        rho: float = 0.05,
        model: nn.Module | None = None,
        seed: int | None = None,
        foreach: bool | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_positive("rho", rho)
        super().__init__(
            params,
            base_optimizer,
            perturbation=GradientPerturbation(adaptive=False),
            method_defaults={"rho": rho},
            model=model,
            seed=seed,
            foreach=foreach,
            grad_scaler=grad_scaler,
            **base_kwargs,
        )


class ASAM(PerturbedOptimizer):
    r"""Adaptive SAM (Kwon et al., 2021): SAM in the scale-invariant geometry :math:`T_w`.

    .. math::

        T_w = |w| + \eta_{\text{adaptive}}, \qquad
        \epsilon = \rho\,\frac{T_w^2 g}{\lVert T_w g\rVert + 10^{-12}}.

    A param group with ``"adaptive": False`` uses :math:`T_w = 1` (plain SAM
    scaling) - ASAM's official code scales only parameters named ``weight``,
    so put biases in such a group to reproduce it;
    :func:`asam_param_groups` builds the groups. With every group
    non-adaptive ASAM is exactly SAM; with a large ``adaptive_eta`` :math:`c`
    and radius :math:`\rho / c` it tends to SAM with radius :math:`\rho`.

    Args:
        params: parameters or parameter groups.
        base_optimizer: optimizer class.
        rho: radius in the :math:`T_w`-scaled geometry (> 0); ASAM's paper uses
            values around 10x SAM's (e.g. 0.5 - 2.0).
        adaptive_eta: the :math:`\eta` of :math:`T_w` (>= 0), default 0.01.
        model, seed, foreach, grad_scaler, **base_kwargs: as for :class:`SAM`.

    Raises:
        ValueError: ``rho <= 0`` or ``adaptive_eta < 0``.

    Closure contract, BatchNorm and gradient zeroing: as for :class:`SAM`.
    """

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[torch.optim.Optimizer],
        *,
        rho: float = 0.5,
        adaptive_eta: float = 0.01,
        model: nn.Module | None = None,
        seed: int | None = None,
        foreach: bool | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_positive("rho", rho)
        check_nonnegative("adaptive_eta", adaptive_eta)
        super().__init__(
            params,
            base_optimizer,
            perturbation=GradientPerturbation(adaptive=True),
            method_defaults={"rho": rho, "adaptive_eta": adaptive_eta, "adaptive": True},
            model=model,
            seed=seed,
            foreach=foreach,
            grad_scaler=grad_scaler,
            **base_kwargs,
        )


ASAM_RULES = ("name", "ndim")


def asam_param_groups(model: nn.Module, rule: str = "name") -> list[dict[str, Any]]:
    r"""Split ``model``'s trainable parameters into an adaptive and a non-adaptive ASAM group.

    Args:
        model: the network.
        rule: which parameters get ASAM's element-wise scaling
            :math:`T_w = |w| + \eta`:

            * ``"name"`` - the official code (SamsungLabs/ASAM, ``if 'weight' in n``):
              every parameter whose qualified name contains ``weight``, which
              includes BatchNorm / LayerNorm weights; biases are not scaled.
            * ``"ndim"`` - only parameters with more than one dimension (conv and
              linear weights); biases and all normalisation parameters are not
              scaled.

    Returns:
        ``[{"params": adaptive, "adaptive": True}, {"params": rest, "adaptive": False}]``
        (an empty group is left out), in ``model.named_parameters()`` order;
        other per-group settings (``weight_decay``, ...) can be added to the dicts.

    Raises:
        ValueError: an unknown ``rule``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> [len(g["params"]) for g in asam_param_groups(net)]
        [2, 2]
        >>> [len(g["params"]) for g in asam_param_groups(net, rule="ndim")]
        [1, 3]
        >>> opt = ASAM(asam_param_groups(net), torch.optim.SGD, lr=0.1, rho=0.5)
    """
    check_choice("rule", rule, ASAM_RULES)
    adaptive: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scaled = "weight" in name if rule == "name" else p.dim() > 1
        (adaptive if scaled else rest).append(p)
    groups = [{"params": adaptive, "adaptive": True}, {"params": rest, "adaptive": False}]
    return [g for g in groups if g["params"]]

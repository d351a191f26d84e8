r"""The random-weight-perturbation family: RWP, ARWP, m-RWP, m-ARWP.

Li et al., TMLR 2024, "Revisiting Random Weight Perturbation for Efficiently
Improving Generalization" (official code: github.com/nblt/mARWP, whose
equations these classes follow; see :mod:`flatness.optim.noise` for the noise).

* **RWP** - one pass at :math:`w + \epsilon`, :math:`\epsilon` filter-wise
  Gaussian with std :math:`\sigma \lVert W_i\rVert` per row; the gradient there
  is applied at :math:`w`. Same cost as the base optimizer.
* **ARWP** - RWP whose row-:math:`i` noise is divided by
  :math:`\sqrt{1 + \eta F_i}`, :math:`F_i \leftarrow \beta F_i + \lVert
  g_{i\cdot}(w+\epsilon)\rVert^2`.
* **m-RWP / m-ARWP** - the mixed objective
  :math:`\lambda L(w+\epsilon) + (1-\lambda) L(w)`, i.e. the update direction

  .. math::

      g = \lambda\, \nabla L(w + \epsilon) + (1 - \lambda)\, \nabla L(w),

  two passes per update.

Batch schemes of the mixed methods (``mix_batches``):

* ``"same"`` - both passes on the current batch; every ``step(closure)`` call
  updates the weights.
* ``"alternate"`` - the official scheme: the clean gradient comes from batch
  :math:`t`, the perturbed one from batch :math:`t+1`, one update per two
  batches. The trainer still calls ``step(closure)`` once per batch: calls
  1, 3, 5, ... run the closure at :math:`w` and stash its gradient (no
  update, ``last_step_updated`` is False); calls 2, 4, 6, ... run the closure
  at :math:`w + \epsilon` and update. Per update this costs one forward-backward
  per batch, so an epoch makes half as many updates (the official code
  doubles the epoch count to compensate). A stashed gradient survives
  ``state_dict()`` / ``load_state_dict()``.

BatchNorm: with ``model=`` the perturbed pass of m-(A)RWP runs under
:func:`~flatness.optim.disable_running_stats`. Single-pass RWP/ARWP have no clean pass,
so their one (perturbed) pass does record the statistics, as in the official
code - otherwise they would never be updated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._checks import check_nonnegative, check_unit_closed, check_unit_half_open
from .perturbation import RandomPerturbation
from .wrapper import ParamsT, PerturbedOptimizer

def _check_rwp(sigma: float, eta: float | None = None, beta: float | None = None) -> None:
    check_nonnegative("sigma", sigma)
    if eta is not None:
        check_nonnegative("eta", eta)
    if beta is not None:
        check_unit_half_open("beta", beta)


class RWP(PerturbedOptimizer):
    r"""Random weight perturbation (one pass, filter-wise noise).

    Args:
        params: parameters or parameter groups.
        base_optimizer: optimizer class, e.g. ``torch.optim.SGD``.
        sigma: relative noise std (>= 0); ``sigma=0`` is the base optimizer.
        model: accepted for a uniform API; the single pass records BatchNorm
            statistics (see module docs).
        seed: seed of the optimizer's own noise generators.
        foreach, grad_scaler, **base_kwargs: see
            :class:`~flatness.optim.wrapper.PerturbedOptimizer`.

    Raises:
        ValueError: ``sigma < 0``.

    Every parameter that requires a gradient is perturbed (its gradient is not
    known before the pass) and restored exactly afterwards, whether or not it
    received a gradient.

    Closure contract: ``closure()`` runs forward and backward on the current
    batch and returns the loss (with ``grad_scaler``: backward of
    ``grad_scaler.scale(loss)``); the optimizer zeroes gradients before each
    call, and refuses gradients accumulated before ``step`` (accumulate through
    ``first_step()`` / ``second_step()``, see
    :mod:`flatness.optim.wrapper`). ``step`` returns the closure's loss at :math:`w` (mixed methods,
    ``"same"``), at :math:`w + \epsilon` (single-pass methods), or - in
    ``"alternate"`` mode - the loss of the call's own pass (clean on the first
    call of a pair, perturbed on the second).
    """

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[torch.optim.Optimizer],
        *,
        sigma: float = 0.01,
        model: nn.Module | None = None,
        seed: int | None = None,
        foreach: bool | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        **base_kwargs: Any,
    ) -> None:
        _check_rwp(sigma)
        super().__init__(
            params,
            base_optimizer,
            perturbation=RandomPerturbation(adaptive=False),
            method_defaults={"sigma": sigma},
            model=model,
            seed=seed,
            foreach=foreach,
            grad_scaler=grad_scaler,
            **base_kwargs,
        )


class ARWP(PerturbedOptimizer):
    r"""Adaptive random weight perturbation (one pass).

    Row :math:`i` of a parameter gets noise with std
    :math:`\sigma\lVert W_i\rVert / \sqrt{1 + \eta F_i}`, where
    :math:`F_i \leftarrow \beta F_i + \lVert g_i\rVert^2` accumulates the squared
    gradient of the perturbed pass (row sums, initialised by the first step;
    element-wise for tensors with at most one dimension, as in the official
    code). The accumulator lives in ``state[p]["fisher"]`` and is only updated
    by finite gradients (an overflowing ``GradScaler`` step leaves it alone);
    with ``grad_scaler`` it sees unscaled gradients.

    Args:
        params: parameters or parameter groups.
        base_optimizer: optimizer class.
        sigma: relative noise std (>= 0). The paper's single-pass recipe grows
            it with :class:`~flatness.optim.CosineInc` (e.g. 0.001 with ``inc=10``).
        eta: adaptivity strength (>= 0); ``eta=0`` draws RWP's noise.
        beta: accumulator decay, ``0 <= beta < 1``.
        model, seed, foreach, grad_scaler, **base_kwargs: as for :class:`RWP`.

    Raises:
        ValueError: ``sigma < 0``, ``eta < 0`` or ``beta`` outside ``[0, 1)``.

    Closure contract: ``closure()`` runs forward and backward on the current
    batch and returns the loss (with ``grad_scaler``: backward of
    ``grad_scaler.scale(loss)``); the optimizer zeroes gradients before each
    call, and refuses gradients accumulated before ``step`` (accumulate through
    ``first_step()`` / ``second_step()``, see
    :mod:`flatness.optim.wrapper`). ``step`` returns the closure's loss at :math:`w` (mixed methods,
    ``"same"``), at :math:`w + \epsilon` (single-pass methods), or - in
    ``"alternate"`` mode - the loss of the call's own pass (clean on the first
    call of a pair, perturbed on the second).
    """

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[torch.optim.Optimizer],
        *,
        sigma: float = 0.01,
        eta: float = 0.1,
        beta: float = 0.99,
        model: nn.Module | None = None,
        seed: int | None = None,
        foreach: bool | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        **base_kwargs: Any,
    ) -> None:
        _check_rwp(sigma, eta, beta)
        super().__init__(
            params,
            base_optimizer,
            perturbation=RandomPerturbation(adaptive=True),
            method_defaults={"sigma": sigma, "eta": eta, "beta": beta},
            model=model,
            seed=seed,
            foreach=foreach,
            grad_scaler=grad_scaler,
            **base_kwargs,
        )


class MRWP(PerturbedOptimizer):
    r"""m-RWP: RWP on the mixed loss :math:`\lambda L(w+\epsilon) + (1-\lambda) L(w)`.

    Update direction :math:`\lambda g(w+\epsilon) + (1-\lambda) g(w)`;
    ``lam=0`` is exactly the base optimizer. Only parameters with a clean
    gradient are perturbed.

    Args:
        params: parameters or parameter groups.
        base_optimizer: optimizer class.
        sigma: relative noise std (>= 0); official recipe 0.015.
        lam: weight of the perturbed gradient, ``0 <= lam <= 1``.
        mix_batches: ``"same"`` (both passes on each batch, one update per
            ``step``) or ``"alternate"`` (official: clean pass on batch t,
            perturbed on batch t+1, an update every second ``step``); see the
            module docs.
        model: network whose BatchNorm layers the perturbed pass leaves alone.
        seed, foreach, grad_scaler, **base_kwargs: as for :class:`RWP`.

    Raises:
        ValueError: ``sigma < 0``, ``lam`` outside ``[0, 1]`` or an unknown
            ``mix_batches``.

    Closure contract: ``closure()`` runs forward and backward on the current
    batch and returns the loss (with ``grad_scaler``: backward of
    ``grad_scaler.scale(loss)``); the optimizer zeroes gradients before each
    call, and refuses gradients accumulated before ``step`` (accumulate through
    ``first_step()`` / ``second_step()``, see
    :mod:`flatness.optim.wrapper`). ``step`` returns the closure's loss at :math:`w` (mixed methods,
    ``"same"``), at :math:`w + \epsilon` (single-pass methods), or - in
    ``"alternate"`` mode - the loss of the call's own pass (clean on the first
    call of a pair, perturbed on the second).
    """

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[torch.optim.Optimizer],
        *,
        sigma: float = 0.015,
        lam: float = 0.5,
        mix_batches: str = "same",
        model: nn.Module | None = None,
        seed: int | None = None,
        foreach: bool | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        **base_kwargs: Any,
    ) -> None:
        _check_rwp(sigma)
        check_unit_closed("lam", lam)
        super().__init__(
            params,
            base_optimizer,
            perturbation=RandomPerturbation(adaptive=False),
            method_defaults={"sigma": sigma, "lam": lam},
            mixing=True,
            mix_batches=mix_batches,
            model=model,
            seed=seed,
            foreach=foreach,
            grad_scaler=grad_scaler,
            **base_kwargs,
        )


class MARWP(PerturbedOptimizer):
    r"""m-ARWP: ARWP noise on the mixed loss (Li et al., 2024, the paper's main method).

    .. math::

        \epsilon_{i\cdot} \sim \mathcal N\!\Big(0, \frac{(\sigma\lVert W_i\rVert)^2}{1+\eta F_i}\Big),\quad
        g = \lambda\,\nabla L(w+\epsilon) + (1-\lambda)\,\nabla L(w),\quad
        F_i \leftarrow \beta F_i + \lVert \nabla_i L(w+\epsilon)\rVert^2.

    Args:
        params: parameters or parameter groups.
        base_optimizer: optimizer class.
        sigma: relative noise std (>= 0); official recipe 0.015.
        lam: weight of the perturbed gradient, ``0 <= lam <= 1`` (0.5).
        eta: adaptivity strength (>= 0); official recipe 0.1.
        beta: accumulator decay, ``0 <= beta < 1``; official recipe 0.99.
        mix_batches: ``"same"`` or ``"alternate"`` (see the module docs).
        model: network whose BatchNorm layers the perturbed pass leaves alone.
        seed, foreach, grad_scaler, **base_kwargs: as for :class:`RWP`.

    Raises:
        ValueError: ``sigma < 0``, ``lam`` outside ``[0, 1]``, ``eta < 0``,
            ``beta`` outside ``[0, 1)`` or an unknown ``mix_batches``.

    Closure contract: ``closure()`` runs forward and backward on the current
    batch and returns the loss (with ``grad_scaler``: backward of
    ``grad_scaler.scale(loss)``); the optimizer zeroes gradients before each
    call, and refuses gradients accumulated before ``step`` (accumulate through
    ``first_step()`` / ``second_step()``, see
    :mod:`flatness.optim.wrapper`). ``step`` returns the closure's loss at :math:`w` (mixed methods,
    ``"same"``), at :math:`w + \epsilon` (single-pass methods), or - in
    ``"alternate"`` mode - the loss of the call's own pass (clean on the first
    call of a pair, perturbed on the second).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
        ...                             torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> opt = MARWP(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
        ...             weight_decay=1e-3, sigma=0.015, lam=0.5, eta=0.1, beta=0.99,
        ...             model=model, seed=0)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
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
        sigma: float = 0.015,
        lam: float = 0.5,
        eta: float = 0.1,
        beta: float = 0.99,
        mix_batches: str = "same",
        model: nn.Module | None = None,
        seed: int | None = None,
        foreach: bool | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        **base_kwargs: Any,
    ) -> None:
        _check_rwp(sigma, eta, beta)
        check_unit_closed("lam", lam)
        super().__init__(
            params,
            base_optimizer,
            perturbation=RandomPerturbation(adaptive=True),
            method_defaults={"sigma": sigma, "lam": lam, "eta": eta, "beta": beta},
            mixing=True,
            mix_batches=mix_batches,
            model=model,
            seed=seed,
            foreach=foreach,
            grad_scaler=grad_scaler,
            **base_kwargs,
        )

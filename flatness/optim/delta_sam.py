r"""delta-SAM: SAM whose ascent direction reweights the instances of the batch.

Zhou, Liu, Zhang and Chen, Findings of EMNLP 2022, "Sharpness-Aware
Minimization with Dynamic Reweighting" (arXiv 2112.08772).

What the paper establishes (abstract and public summaries; the full text was
not reachable when this was written): SAM's single per-batch perturbation is a
weaker adversary than per-instance perturbations; a per-batch perturbation
computed from a *reweighted* batch loss approximates the per-instance ones,
up-weighting the instances that are least "guarded" - whose loss changes most
under a weight perturbation; the weights are estimated from random Gaussian
weight perturbations at the cost of three extra forward passes (no
backward), about 18% over SAM.

.. warning::

   RECONSTRUCTION. The paper's exact weighting formula could not be
   retrieved, so the weights below are the most defensible reading of the
   description above, not a transcription. Results may differ from the paper.

Reconstructed update, with per-instance losses :math:`\ell_i`, batch size
:math:`B`, :math:`K` probes :math:`z_k` drawn uniformly on the sphere of radius
:math:`\rho` (Gaussian direction, global norm):

.. math::

    s_i &= \frac1K \sum_{k=1}^{K} \big|\ell_i(w + z_k) - \ell_i(w)\big|
        \quad(\approx \rho\sqrt{2/\pi}\,\lVert\nabla\ell_i\rVert/\sqrt d:
        \text{ how unguarded instance } i \text{ is}),\\
    a &= B\,\operatorname{softmax}\!\Big(\frac{s / (\bar s + 10^{-12})}{\tau}\Big),
        \qquad \bar s = \tfrac1B \textstyle\sum_i s_i,\\
    \epsilon &= \rho\,\frac{g_a}{\lVert g_a\rVert + 10^{-12}},
        \qquad g_a = \nabla_w \tfrac1B \textstyle\sum_i a_i\,\ell_i(w),\\
    w &\leftarrow \text{base\_step}\Big(w,\ \nabla_w \tfrac1B \textstyle\sum_i \ell_i(w+\epsilon)\Big).

The weights have mean 1; :math:`\tau \to \infty` gives uniform weights, i.e.
exactly SAM. Normalising :math:`s` by its batch mean makes :math:`\tau`
independent of the loss scale and of :math:`\rho`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_positive, check_positive_int
from .bn import disable_running_stats
from .noise import sphere_noise_
from .perturbation import GradientPerturbation
from .wrapper import ParamsT, PerturbedOptimizer

PerSampleClosure = Callable[[], Tensor]

_BACKWARD_IN_CLOSURE = (
    "DeltaSAM's closure must run the forward pass only and return per-sample losses of "
    "shape (batch,), e.g. F.cross_entropy(model(x), y, reduction='none'), without calling "
    "backward (DeltaSAM runs backward itself, through grad_scaler when given); this closure "
    "calls backward"
)


def instance_weights(probe_losses: Tensor, clean_losses: Tensor, temperature: float) -> Tensor:
    r"""delta-SAM instance weights (reconstruction, see the module docs).

    Args:
        probe_losses: ``(K, B)`` per-instance losses at the probed weights.
        clean_losses: ``(B,)`` per-instance losses at :math:`w`.
        temperature: softmax temperature :math:`\tau > 0`.

    Returns:
        ``(B,)`` weights with mean 1, larger for instances whose loss moves more.
    """
    change = (probe_losses.float() - clean_losses.float()).abs().mean(dim=0)
    relative = change / (change.mean() + 1e-12)
    return torch.softmax(relative / temperature, dim=0) * change.numel()


class DeltaSAM(PerturbedOptimizer):
    r"""delta-SAM (Zhou et al., 2022) - RECONSTRUCTED weighting, see the module docs.

    Per ``step``: ``num_perturbations`` forward passes at random probes
    :math:`w + z_k` (no gradient, BatchNorm statistics frozen), one clean
    forward-backward of the reweighted loss, one forward-backward of the plain
    mean loss at :math:`w + \epsilon`; then the base optimizer step.

    Closure contract (differs from the other optimizers): ``closure()`` runs
    the *forward pass only* on the current batch and returns the vector of
    per-sample losses, shape ``(B,)`` (e.g. ``F.cross_entropy(out, y,
    reduction="none")``); the optimizer calls ``backward`` itself (through
    ``grad_scaler`` when given) and zeroes gradients before each pass. It is
    called ``num_perturbations + 2`` times per step, the probes under
    ``torch.no_grad()``. ``per_sample_closure`` is True on this class so a
    trainer can branch on it. ``step`` returns the mean clean loss (0-dim).
    A trainer that logs the loss or logits of the closure's *first* call must
    skip the probes: log the first call made with ``torch.is_grad_enabled()``
    (the clean pass at :math:`w`), or use the value ``step`` returns.

    Custom loops: ``probe_losses(closure)`` (before the clean pass), then the
    clean forward, ``instance_weights(probes, losses, temperature)``, backward
    of ``(weights * losses).mean()``, ``first_step()``, the perturbed
    forward-backward, ``second_step()``.

    Args:
        params: parameters or parameter groups.
        base_optimizer: optimizer class.
        rho: SAM radius (> 0), also the radius of the random probes (the first
            group's value).
        temperature: softmax temperature :math:`\tau` (> 0); large values give SAM.
        num_perturbations: number :math:`K` of random probes (>= 1), 3 as in
            the paper's cost estimate.
        model: network whose BatchNorm layers the probe and perturbed passes
            leave alone.
        seed, foreach, grad_scaler, **base_kwargs: see
            :class:`~flatness.optim.wrapper.PerturbedOptimizer`.

    Raises:
        ValueError: ``rho <= 0``, ``temperature <= 0`` or ``num_perturbations < 1``;
            from ``step``: a closure that returns anything but per-sample losses,
            or an ordinary closure that calls ``backward`` (it would fail in
            the probes with torch's "element 0 of tensors does not require grad").

    Mixed precision: with ``grad_scaler`` the closure still returns unscaled
    per-sample losses; DeltaSAM calls ``grad_scaler.scale(loss).backward()``
    itself (the other optimizers' closures do that call).
    """

    per_sample_closure = True

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[torch.optim.Optimizer],
        *,
        rho: float = 0.05,
        temperature: float = 1.0,
        num_perturbations: int = 3,
        model: nn.Module | None = None,
        seed: int | None = None,
        foreach: bool | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_positive("rho", rho)
        check_positive("temperature", temperature)
        check_positive_int("num_perturbations", num_perturbations)
        super().__init__(
            params,
            base_optimizer,
            perturbation=GradientPerturbation(adaptive=False),
            method_defaults={
                "rho": rho,
                "temperature": temperature,
                "num_perturbations": num_perturbations,
            },
            model=model,
            seed=seed,
            foreach=foreach,
            grad_scaler=grad_scaler,
            **base_kwargs,
        )

    @staticmethod
    def _per_sample(losses: Tensor) -> Tensor:
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(
                "DeltaSAM's closure must return per-sample losses of shape (batch,), "
                f"got {shape}; use reduction='none' and do not call backward"
            )
        return losses

    @staticmethod
    def _probe(closure: PerSampleClosure) -> Tensor:
        """One probe forward (under ``no_grad``); an ordinary closure that calls
        ``backward`` fails here, so say what the closure must do instead."""
        try:
            return DeltaSAM._per_sample(closure()).detach()
        except RuntimeError as err:
            if "does not require grad" not in str(err):
                raise
            raise ValueError(_BACKWARD_IN_CLOSURE) from err

    def _check_no_backward(self) -> None:
        # A Python-level look at .grad (no tensor values read: no host sync).
        if any(p.grad is not None for group in self.param_groups for p in group["params"]):
            raise ValueError(_BACKWARD_IN_CLOSURE)

    @torch.no_grad()
    def probe_losses(self, closure: PerSampleClosure) -> Tensor:
        """Per-sample losses at ``num_perturbations`` random probes, shape ``(K, B)``.

        The weights are restored exactly afterwards; BatchNorm statistics (with
        ``model``) are untouched.
        """
        group0 = self.param_groups[0]
        params, backups, foreach = [], [], False
        for group in self.param_groups:
            chosen = [p for p in group["params"] if p.requires_grad]
            params.extend(chosen)
            foreach = foreach or self._foreach(group, chosen)
        backups = [self._backup(p) for p in params]
        if foreach:
            torch._foreach_copy_(backups, params)
        else:
            for p, b in zip(params, backups):
                b.copy_(p)
        probes = []
        self.rng.next_draw()
        try:
            with disable_running_stats(self.model):
                for _ in range(group0["num_perturbations"]):
                    sphere_noise_(
                        params, backups, radius=group0["rho"], generator=self.rng.get, foreach=foreach
                    )
                    probes.append(self._probe(closure))
        finally:
            if foreach:
                torch._foreach_copy_(params, backups)
            else:
                for p, b in zip(params, backups):
                    p.copy_(b)
        return torch.stack(probes)

    def _no_closure_message(self) -> str:
        return (
            "DeltaSAM.step() needs a closure that runs the forward pass only and returns "
            "per-sample losses: it runs num_perturbations + 2 forward passes per update (probes, "
            "w, w + eps), so a trainer that back-propagates and then calls optimizer.step() "
            "(Hugging Face Trainer, Lightning with manual backward) would train a different "
            "method; pass step(closure), use flatness.integrations.hf (Hugging Face Trainer) or "
            "flatness.integrations.lightning (Lightning), or run the custom-loop route "
            "(probe_losses(closure), the reweighted backward at w, first_step(), the backward at "
            "w + eps, second_step())"
        )

    @torch.no_grad()
    def step(self, closure: PerSampleClosure | None = None) -> Tensor:  # type: ignore[override]
        """One delta-SAM update on the current batch; returns the mean clean loss.

        Raises:
            TypeError: no closure.
            ValueError: gradients already accumulated in ``.grad``, or a closure
                that does not return per-sample losses.

        An exception in the closure (any of its calls; ``KeyboardInterrupt``
        included) undoes the step, as for :meth:`PerturbedOptimizer.step`.
        """
        self._check_can_step(closure)
        undo = self._save_undo()
        self.last_step_updated = False
        try:
            probes = self.probe_losses(closure)
            self.zero_grad(set_to_none=True)
            with torch.enable_grad():
                losses = self._per_sample(closure())
                self._check_no_backward()
                weights = instance_weights(probes, losses.detach(), self.param_groups[0]["temperature"])
                self._backward((weights.to(losses.dtype) * losses).mean())
            self._first_step()
            with torch.enable_grad(), disable_running_stats(self.model):
                self._backward(self._per_sample(closure()).mean())
        except BaseException:
            self._rollback(undo)
            raise
        self.second_step()
        return losses.detach().mean()

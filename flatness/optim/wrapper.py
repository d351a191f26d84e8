r"""The two-pass optimizer wrapper that every method in :mod:`flatness.optim` builds on.

:class:`PerturbedOptimizer` wraps a base optimizer (``torch.optim.SGD``, ``Adam``,
...) the way the well-known SAM implementations do (davda54/sam): the wrapper
and the base optimizer share one ``param_groups`` list, so learning-rate
schedulers, ``add_param_group`` and per-group hyperparameters work on either.
What is specific to a method is the :class:`~flatness.optim.perturbation.Perturbation`
it plugs in (and, for m-(A)RWP, the gradient mixing).

One update, in the general form (SAM: :math:`\lambda = 1`; m-(A)RWP:
:math:`0 \le \lambda \le 1`; RWP/ARWP: one pass, :math:`\lambda = 1`):

.. math::

    g = \lambda\, \nabla L(w + \epsilon) + (1-\lambda)\, \nabla L(w),
    \qquad w \leftarrow \text{base\_step}(w, g).

Gradient zeroing - who zeroes what:

* ``step(closure)`` sets every gradient to ``None`` before *each* call of the
  closure; the closure only runs forward + backward (a ``zero_grad()`` inside
  it is harmless). After the update, ``.grad`` holds the gradient that was
  applied (the mixed one for m-(A)RWP), as with any torch optimizer.
* ``first_step()`` consumes the gradients: it stashes them (m-(A)RWP) or turns
  them into :math:`\epsilon` (SAM), moves to :math:`w + \epsilon`, and leaves
  every ``.grad`` as ``None``. ``second_step()`` restores :math:`w` exactly,
  combines gradients, and calls the base optimizer; it leaves ``.grad`` as the
  applied gradient. ``cancel_step()`` abandons a step begun by ``first_step()``.

Gradient accumulation - the contract: ``step(closure)`` never uses, and never
silently drops, gradients already in ``.grad``. At entry it accepts ``None`` or
the very tensor it (or ``second_step()``, or ``opt.zero_grad(set_to_none=False)``)
left there, with an unchanged autograd version counter - a Python-level check,
no host synchronisation; anything else (micro-batches back-propagated before
``step``, Lightning's ``accumulate_grad_batches > 1``) raises a one-line
``ValueError`` naming accumulation. Accumulate through ``first_step()`` /
``second_step()``, which use whatever ``.grad`` holds: backward of every
micro-batch at :math:`w`, ``first_step()``, backward of every micro-batch at
:math:`w + \epsilon`, ``second_step()`` (RWP/ARWP: ``first_step()``, the
micro-batches, ``second_step()``) - exactly one step on the whole batch.
``step()`` without a closure is a one-line ``TypeError`` naming
``flatness.integrations.hf``, ``flatness.integrations.lightning`` and that route.

Exceptions: if the closure raises (``KeyboardInterrupt`` included), ``step``
restores :math:`w` bitwise on the parameters' own storage and its own state
(noise counter, ``"alternate"`` phase and stash, lazily created state,
counters), clears ``.grad`` and re-raises the same exception, with
``try/except BaseException: rollback; raise``; the next ``step`` gives what it
would have given had the failed one never been tried.

Mixed precision: run the closure's forward under ``torch.autocast``. With a
``GradScaler``, pass it as ``grad_scaler=scaler`` and backpropagate
``scaler.scale(loss)`` in the closure, but do not call ``scaler.step`` or
``scaler.update`` yourself: the optimizer calls ``scaler.step(base_optimizer)``
and ``scaler.update()`` exactly once per update (in ``"alternate"`` mode on
the second call of a pair). An overflowing step is skipped as usual; the
weights are still restored exactly, and ARWP accumulators ignore the step and
otherwise see unscaled gradients::

    scaler = torch.amp.GradScaler("cuda")
    opt = MARWP(model.parameters(), torch.optim.SGD, lr=0.1, model=model,
                grad_scaler=scaler)
    def closure():
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        return loss
    opt.step(closure)

Performance contract: no host synchronisation inside ``step`` (no ``.item()``,
``.cpu()``, ``.tolist()``, no Python branching on tensor values) - except,
with ``grad_scaler``, the scaler's own inf check (``GradScaler.step`` reads
``found_inf`` on the host to skip an overflowing update: one sync per update);
``torch._foreach_*`` over parameter lists (``foreach=None`` picks them on
accelerators, as torch.optim does); at most two extra parameter-sized
buffers - the second weight buffer and, for m-(A)RWP, the stashed clean
gradient (which *is* the first pass's ``.grad`` tensor, moved aside, not
copied - unless it is a view into a buffer that the next backward rewrites,
as with DDP's ``gradient_as_bucket_view=True``: then it is cloned).

How :math:`w` survives the perturbed pass:

* SAM family: :math:`w` is copied into the buffer, :math:`w+\epsilon` is
  written into the parameters, and one copy back restores :math:`w`.
* RWP family (random noise): the noise is drawn into the buffer and turned
  into :math:`w + \epsilon` there in one fused pass; each parameter's
  ``.data`` is then pointed at the buffer for the perturbed pass and back at
  its own, untouched storage afterwards (the official ARWP code restores with
  ``p.data = old_p`` too). :math:`w` is never copied and comes back bit for
  bit; the noise is the same as with copying, bitwise. A parameter group that
  holds a parameter sharing its storage (a view into a flat buffer) is
  perturbed in place and restored by copy instead, so code that reads the
  weights through the buffer sees the perturbation. Code that captured the
  parameters' addresses (CUDA graphs, ``torch.compile(mode="reduce-overhead")``)
  must set ``opt.swap_storage = False`` (copy semantics, two more passes
  over the weights per update).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ._checks import check_base_optimizer, check_choice, check_foreach
from .bn import disable_running_stats
from .perturbation import Perturbation, Slice
from .rng import NoiseGenerators

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]
Closure = Callable[[], Tensor]

MIX_BATCHES = ("same", "alternate")


def _owns_storage(p: Tensor) -> bool:
    # A parameter that is a view into a larger buffer (flat-parameter schemes)
    # must be perturbed in place: code may read the weights through the buffer.
    return (
        p._base is None
        and p.storage_offset() == 0
        and p.is_contiguous()
        and p.untyped_storage().nbytes() == p.numel() * p.element_size()
    )


@dataclass
class _Undo:
    """What a step may change before its update is applied: enough to roll it back."""

    rng: dict[str, int]
    phase: int
    clean: dict[Tensor, Tensor]
    last_step_updated: bool
    #: number of keys of each ``state[p]``: a step only adds keys (lazily created
    #: accumulators), and dicts keep insertion order, so the extra ones are the last
    state_sizes: dict[Tensor, int]


def _default_foreach(params: list[Tensor]) -> bool:
    # torch.optim's rule: foreach kernels on accelerators, a plain loop on CPU.
    return bool(params) and all(p.device.type not in ("cpu", "meta") for p in params)


class PerturbedOptimizer(torch.optim.Optimizer):
    """Base class: a base optimizer plus a pluggable weight perturbation.

    Subclasses (:class:`~flatness.optim.SAM`, :class:`~flatness.optim.MARWP`, ...) choose the
    perturbation and whether the perturbed gradient is mixed with the clean
    one; this class owns everything else.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        base_optimizer: the optimizer *class* that applies the update, e.g.
            ``torch.optim.SGD``; it is built over the same param groups with
            ``**base_kwargs``.
        perturbation: how :math:`w + \\epsilon` is made.
        method_defaults: the method's hyperparameters (stored in ``defaults`` and
            thus in every param group).
        mixing: combine :math:`\\lambda g(w+\\epsilon) + (1-\\lambda) g(w)`
            (m-(A)RWP); reads ``lam`` from each group.
        mix_batches: ``"same"`` or ``"alternate"`` (only with ``mixing``), see
            :class:`~flatness.optim.MARWP`.
        model: the network; when given, the perturbed pass runs inside
            :func:`~flatness.optim.disable_running_stats` so BatchNorm running statistics
            only record clean passes.
        seed: seed of the noise generators (``None``: ``torch.initial_seed()``).
        foreach: ``torch._foreach_*`` kernels (``None``: on accelerators only).
            Stored in the groups, so the base optimizer follows the same choice.
        grad_scaler: an enabled ``torch.amp.GradScaler`` makes the optimizer call
            ``scaler.step(base_optimizer)`` and ``scaler.update()`` once per
            update; the closure must then backpropagate ``scaler.scale(loss)``.
        **base_kwargs: hyperparameters of the base optimizer (``lr``,
            ``momentum``, ``weight_decay``, ...).

    Attributes:
        base_optimizer: the wrapped optimizer instance.
        num_updates: number of base-optimizer updates made so far.
        last_step_updated: whether the last ``step(closure)`` call updated the
            weights (always True except in the first half of an
            ``"alternate"`` pair), e.g. to step per-update schedulers.
    """

    #: The closure returns per-sample losses and does no backward (delta-SAM).
    per_sample_closure: ClassVar[bool] = False
    #: Random perturbations run the perturbed pass on a second storage instead
    #: of copying w (see the module docs); set False on an instance to copy.
    swap_storage: bool = True

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[torch.optim.Optimizer],
        *,
        perturbation: Perturbation,
        method_defaults: dict[str, Any],
        mixing: bool = False,
        mix_batches: str = "same",
        model: nn.Module | None = None,
        seed: int | None = None,
        foreach: bool | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_base_optimizer(base_optimizer)
        check_foreach(foreach)
        check_choice("mix_batches", mix_batches, MIX_BATCHES)
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        defaults = dict(method_defaults, foreach=foreach, **base_kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.defaults["foreach"] = foreach
        self.perturbation = perturbation
        self.mixing = mixing
        self.mix_batches = mix_batches
        self.model = model
        self.grad_scaler = grad_scaler
        self.rng = NoiseGenerators(seed)
        self.num_updates = 0
        self.last_step_updated = False
        self._phase = 0  # "alternate": 1 once a clean gradient is stashed
        self._backups: dict[Tensor, Tensor] = {}
        self._clean: dict[Tensor, Tensor] = {}
        self._perturbed: list[Slice] = []
        self._cancel: _Undo | None = None  # set by first_step(), for cancel_step()
        # The gradients step() / second_step() / zero_grad() left in .grad, with
        # their version counters: anything else found there was accumulated.
        self._grad_marks: dict[Tensor, tuple[weakref.ref, int]] = {}

    # ------------------------------------------------------------------ helpers
    def _foreach(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        flag = group.get("foreach")
        return _default_foreach(params) if flag is None else flag

    def _backup(self, p: Tensor) -> Tensor:
        buf = self._backups.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = torch.empty_like(p)
            self._backups[p] = buf
        return buf

    def _selected(self, p: Tensor) -> bool:
        if self.perturbation.uses_gradient:
            return p.grad is not None
        if self.mixing:
            return p in self._clean
        return p.requires_grad

    def _scaler_enabled(self) -> bool:
        return self.grad_scaler is not None and self.grad_scaler.is_enabled()

    def _inv_scale(self) -> Tensor | None:
        if not self._scaler_enabled():
            return None
        # GradScaler keeps its scale as a device tensor; reading it through the
        # public get_scale() would be a host sync.
        scale = self.grad_scaler._get_scale_async()  # type: ignore[union-attr]
        if scale is None:
            return None
        return scale.double().reciprocal().float()

    def _backward(self, loss: Tensor) -> None:
        if self._scaler_enabled():
            loss = self.grad_scaler.scale(loss)  # type: ignore[union-attr]
        loss.backward()

    def _perturbed_pass(self, closure: Closure) -> Tensor:
        self.zero_grad(set_to_none=True)
        with disable_running_stats(self.model):
            return closure()

    # ------------------------------------------------------------- the passes
    def _stash_clean_grads(self) -> None:
        """Move each ``.grad`` aside as the clean gradient (no copy).

        A gradient that is a view into a shared buffer (DDP's
        ``gradient_as_bucket_view=True``) is cloned instead: the next backward
        writes into that buffer again and would overwrite the stash.
        """
        self._clean = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grad = p.grad
                    self._clean[p] = grad if _owns_storage(grad) else grad.clone()
                    p.grad = None

    def _swap(self, params: list[Tensor]) -> bool:
        """Whether the perturbed pass may run on a second storage (see the class docs)."""
        return (
            self.swap_storage
            and self.perturbation.can_swap
            and all(_owns_storage(p) for p in params)
        )

    def _perturb(self) -> None:
        slices = []
        for group in self.param_groups:
            params = [p for p in group["params"] if self._selected(p)]
            slices.append(
                Slice(
                    group=group,
                    params=params,
                    backups=[self._backup(p) for p in params],
                    grads=[p.grad for p in params] if self.perturbation.uses_gradient else [],
                    states=[self.state[p] for p in params],
                    foreach=self._foreach(group, params),
                    swap=self._swap(params),
                )
            )
        for s in slices:  # copy path: w goes into the backups before anything moves
            if s.params and not s.swap:
                if s.foreach:
                    torch._foreach_copy_(s.backups, s.params)
                else:
                    for p, b in zip(s.params, s.backups):
                        b.copy_(p)
        # From here on _restore() brings w back exactly, however far the rest got.
        self._perturbed = slices
        self.rng.next_draw()
        self.perturbation.perturb_(slices, self.rng)
        for s in slices:
            if s.swap:  # params -> the buffers holding w + eps; originals keep w
                for p, buf in zip(s.params, s.backups):
                    s.originals.append(p.data)
                    p.data = buf
        self.zero_grad(set_to_none=True)

    def _restore(self) -> None:
        """Bring back w exactly (idempotent: safe to repeat after an interruption)."""
        for s in self._perturbed:
            if not s.params:
                continue
            if s.swap:
                for p, w in zip(s.params, s.originals):
                    p.data = w
            elif s.foreach:
                torch._foreach_copy_(s.params, s.backups)
            else:
                for p, b in zip(s.params, s.backups):
                    p.copy_(b)

    def _observe(self, perturbed: list[Slice]) -> None:
        slices = []
        for s in perturbed:
            keep = [i for i, p in enumerate(s.params) if p.grad is not None]
            slices.append(
                Slice(
                    group=s.group,
                    params=[s.params[i] for i in keep],
                    backups=[],
                    grads=[s.params[i].grad for i in keep],
                    states=[s.states[i] for i in keep],
                    foreach=s.foreach,
                )
            )
        self.perturbation.observe_(slices, self._inv_scale())

    def _mix(self) -> None:
        for group in self.param_groups:
            lam = group["lam"]
            starts, ends = [], []
            for p in group["params"]:
                clean, pert = self._clean.get(p), p.grad
                if clean is not None and pert is not None:
                    starts.append(clean)
                    ends.append(pert)
                    p.grad = clean
                elif pert is not None:  # a missing gradient counts as zero
                    pert.mul_(lam)
                elif clean is not None:
                    p.grad = clean.mul_(1.0 - lam)
            if not starts:
                continue
            if self._foreach(group, starts):
                torch._foreach_lerp_(starts, ends, lam)
            else:
                for start, end in zip(starts, ends):
                    start.lerp_(end, lam)

    def _base_step(self) -> None:
        if self._scaler_enabled():
            self.grad_scaler.step(self.base_optimizer)  # type: ignore[union-attr]
            self.grad_scaler.update()  # type: ignore[union-attr]
        else:
            self.base_optimizer.step()

    # ------------------------------------------- accumulation and no-closure checks
    def _mark_grads(self) -> None:
        """Remember the gradients now in ``.grad`` (object and version counter)."""
        marks = {}
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is not None:
                    marks[p] = (weakref.ref(grad), grad._version)
        self._grad_marks = marks

    def _grad_origin(self, p: Tensor, grad: Tensor) -> str:
        """``"left"``: a gradient this optimizer left in ``.grad``, untouched since;
        ``"touched"``: such a gradient, back-propagated into (or changed) since;
        ``"new"``: any other tensor. Reads Python objects and version counters
        only: no host synchronisation."""
        mark = self._grad_marks.get(p)
        if mark is None or mark[0]() is not grad:
            return "new"
        return "left" if mark[1] == grad._version else "touched"

    def _has_grads(self, origins: tuple[str, ...]) -> bool:
        """Whether some ``.grad`` has one of these origins (see :meth:`_grad_origin`)."""
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is not None and self._grad_origin(p, grad) in origins:
                    return True
        return False

    def _single_pass(self) -> bool:
        return not self.perturbation.uses_gradient and not self.mixing

    def _accumulation_recipe(self) -> str:
        if self._single_pass():
            return (
                "first_step() once, then forward + backward of every micro-batch (at w + eps), "
                "then second_step()"
            )
        return (
            "forward + backward of every micro-batch (at w), first_step(), forward + backward "
            "of every micro-batch again (at w + eps, under disable_running_stats(model)), "
            "second_step()"
        )

    def _refuse_accumulated(self) -> None:
        """``step(closure)`` runs every pass itself: gradients already in ``.grad``
        (other than the ones the last update left there) would be dropped."""
        if not self._has_grads(("new", "touched")):
            return
        name = type(self).__name__
        raise ValueError(
            f"{name}.step(closure) found gradients accumulated in .grad before it was called "
            "(gradient accumulation, e.g. micro-batches back-propagated before step() or "
            "Lightning's accumulate_grad_batches > 1): a two-pass method cannot reuse gradients "
            "computed at w for its pass at w + eps, and it will not drop them silently; call "
            "opt.zero_grad() before step(closure) and let the closure run the whole batch, or "
            f"accumulate by hand with opt.zero_grad(), {self._accumulation_recipe()} "
            "(docs/methods.md, 'Gradient accumulation')"
        )

    def _check_grads_at_first_step(self) -> None:
        name = type(self).__name__
        if self._single_pass():
            if self._has_grads(("new", "touched")):
                raise ValueError(
                    f"{name}.first_step() found gradients in .grad: it perturbs the weights "
                    "before the forward pass, so gradients computed at w would be dropped; call "
                    f"opt.zero_grad() first, then {self._accumulation_recipe()}"
                )
        elif self._has_grads(("touched",)):
            raise ValueError(
                f"{name}.first_step(): the gradients that the last update left in .grad were "
                "back-propagated into again, so they hold the previous update's gradient plus "
                "this batch's; call opt.zero_grad() before the backward pass at w"
            )

    def _check_can_step(self, closure: Any) -> None:
        """Refuse a ``step`` without a closure, in the middle of a step, or over accumulated gradients (one line each)."""
        if closure is None:
            raise TypeError(self._no_closure_message())
        if self._perturbed:
            raise RuntimeError(
                "step() called between first_step() and second_step(); finish the step "
                "with second_step() or abandon it with cancel_step()"
            )
        self._refuse_accumulated()

    def _no_closure_message(self) -> str:
        name = type(self).__name__
        if self._single_pass():
            why = "it must perturb the weights before the forward pass"
            manual = "call first_step() before the forward pass and second_step() after backward"
        else:
            why = "it runs two forward + backward passes per update (at w and at w + eps)"
            manual = (
                "call first_step() after the backward pass at w and second_step() after the "
                "backward pass at w + eps"
            )
        return (
            f"{name}.step() needs a closure: {why}, so a trainer that back-propagates and then "
            "calls optimizer.step() (Hugging Face Trainer, Lightning with manual backward, "
            "most hand-written loops) would train a different method; pass step(closure) with a "
            "closure that runs forward + backward and returns the loss, use "
            "flatness.integrations.hf (Hugging Face Trainer) or flatness.integrations.lightning "
            f"(Lightning), or {manual}"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; ``step`` then accepts the zeroed ``.grad``
        (``set_to_none=False``) as not accumulated."""
        super().zero_grad(set_to_none=set_to_none)
        if set_to_none:  # every .grad of the groups is None now
            self._grad_marks = {}
        else:
            self._mark_grads()

    # -------------------------------------------------------- undo on error
    def _save_undo(self) -> _Undo:
        return _Undo(
            rng=self.rng.state_dict(),
            phase=self._phase,
            clean=self._clean,
            last_step_updated=self.last_step_updated,
            state_sizes={p: len(state) for p, state in self.state.items()},
        )

    def _rollback(self, undo: _Undo) -> None:
        """Return to ``undo``: w on its own storage, bitwise; counters, noise stream,
        stashed gradient and per-parameter state as they were; ``.grad`` cleared.

        Only state that changes before the update is applied needs undoing: the
        base optimizer, the ARWP accumulators, the scaler and ``num_updates``
        change after the last closure call has returned.
        """
        if self._perturbed:
            self._restore()
            self._perturbed = []
        self._cancel = None
        self.rng.load_state_dict(undo.rng)
        self._phase = undo.phase
        self._clean = undo.clean
        self.last_step_updated = undo.last_step_updated
        for p in list(self.state):
            size = undo.state_sizes.get(p)
            if size is None:  # created by the abandoned step (lazy accumulators)
                del self.state[p]
                continue
            state = self.state[p]
            for key in list(state)[size:]:
                del state[key]
        self.zero_grad(set_to_none=True)

    # -------------------------------------------------------------- the steps
    def _first_step(self) -> None:
        if self.mixing:
            self._stash_clean_grads()
        self._perturb()

    @torch.no_grad()
    def first_step(self) -> None:
        """Move from :math:`w` to :math:`w + \\epsilon`; consumes the gradients.

        For gradient-based methods (SAM family) call it after the clean
        backward pass; for m-(A)RWP it also stashes the clean gradient; for
        single-pass RWP/ARWP call it before the (only) forward pass, with no
        gradient in ``.grad``. Gradients accumulated over several micro-batches
        are fine: first_step() uses whatever ``.grad`` holds (see
        docs/methods.md, "Gradient accumulation").

        To abandon the step before :meth:`second_step` (an exception in your
        forward pass, a smaller batch to retry), call :meth:`cancel_step`.

        Raises:
            RuntimeError: a step begun by first_step() is still in progress.
            ValueError: RWP/ARWP found gradients in ``.grad`` (they would be
                dropped); SAM-family / m-(A)RWP found that the gradient the last
                update left in ``.grad`` was back-propagated into without
                ``zero_grad()``.
        """
        if self._perturbed:
            raise RuntimeError(
                "first_step() called twice without second_step() in between "
                "(cancel_step() abandons the step in progress)"
            )
        self._check_grads_at_first_step()
        undo = self._save_undo()
        try:
            self._first_step()
        except BaseException:
            self._rollback(undo)
            raise
        self._cancel = undo

    @torch.no_grad()
    def second_step(self) -> None:
        """Restore :math:`w`, combine gradients and apply the base optimizer."""
        if not self._perturbed:
            raise RuntimeError("second_step() called without a preceding first_step()")
        perturbed = self._perturbed
        self._restore()
        self._perturbed = []
        self._cancel = None
        self._observe(perturbed)
        if self.mixing:
            self._mix()
        self._base_step()
        self._clean = {}
        self.num_updates += 1
        self.last_step_updated = True
        self._mark_grads()

    @torch.no_grad()
    def cancel_step(self) -> None:
        """Abandon the step begun by :meth:`first_step` without updating.

        Restores :math:`w` bit for bit (on the parameters' own storage), the
        noise counter, the stashed gradient and every per-parameter state as
        they were before first_step(), and clears ``.grad``; the next
        first_step() / step() then behaves as if this step had never been
        attempted. Does nothing when no step is in progress. ``step(closure)``
        needs no call: it undoes itself when the closure raises.

        Example:
            >>> import torch
            >>> from flatness.optim import SAM
            >>> model = torch.nn.Linear(4, 2)
            >>> opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.05)
            >>> before = model.weight.detach().clone()
            >>> model(torch.randn(8, 4)).square().mean().backward()
            >>> opt.first_step()
            >>> opt.cancel_step()       # e.g. the perturbed pass ran out of memory
            >>> bool(torch.equal(model.weight, before))
            True
        """
        if self._cancel is not None:
            self._rollback(self._cancel)
        elif self._perturbed:  # only after an interrupted second_step()
            self._restore()
            self._perturbed = []
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One call per batch: runs the closure as often as the method needs.

        Args:
            closure: forward + backward on the current batch, returning the
                loss; called under ``torch.enable_grad()``.

        Returns:
            The loss of the clean pass (the closure's value at :math:`w`); for
            single-pass RWP/ARWP the loss at :math:`w + \\epsilon`.

        Raises:
            TypeError: no closure (the message names the integrations and the
                first_step() / second_step() route).
            ValueError: ``.grad`` already holds accumulated gradients (see
                docs/methods.md, "Gradient accumulation").

        If the closure raises - any exception, ``KeyboardInterrupt`` included -
        the step is undone before the exception propagates: the weights are
        :math:`w` again, bitwise and on their own storage, and the optimizer's
        state (noise counter, ``"alternate"`` phase and stashed gradient,
        accumulators, counters) is what it was before the call, so
        ``model.state_dict()`` in the handler holds :math:`w` and the next
        ``step`` gives what it would have given had this one never been tried.
        ``.grad`` is cleared. (BatchNorm running statistics recorded by a
        forward pass that completed before the exception are the model's, not
        the optimizer's, and stay recorded.)
        """
        self._check_can_step(closure)
        closure = torch.enable_grad()(closure)
        undo = self._save_undo()
        self.last_step_updated = False
        self.zero_grad(set_to_none=True)
        alternate = self.mixing and self.mix_batches == "alternate"
        stash_only = alternate and self._phase == 0
        try:
            if self._single_pass():
                # Single pass (RWP/ARWP): it is the only pass, so it also records
                # BatchNorm statistics, as in the official code.
                self._perturb()
                loss = closure()
            elif stash_only:  # "alternate", first call of a pair: the clean pass
                loss = closure()
            elif alternate:  # second call of a pair: the perturbed pass
                self._perturb()
                loss = self._perturbed_pass(closure)
            else:
                loss = closure()
                self._first_step()
                self._perturbed_pass(closure)
        except BaseException:
            # try/except BaseException, not finally: KeyboardInterrupt and
            # SystemExit must undo the step too, and success must not.
            self._rollback(undo)
            raise
        if stash_only:
            self._stash_clean_grads()
            self._phase = 1
            self._mark_grads()
        else:
            self.second_step()
            if alternate:
                self._phase = 0
        return loss

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: base optimizer state (momentum, ...),
        accumulators (``state[p]``), counters, the noise generators' state
        (seed, stream, draw counter; see :mod:`flatness.optim.rng`) and, between the two
        batches of an ``"alternate"`` pair, the stashed clean gradient. Only
        tensors and plain Python values, so ``torch.load(weights_only=True)``
        reads it back."""
        if self._perturbed:
            raise RuntimeError(
                "state_dict() called between first_step() and second_step(): the weights "
                "are perturbed; checkpoint after second_step(), or call cancel_step() to "
                "abandon the step"
            )
        state = super().state_dict()
        state["base_optimizer"] = self.base_optimizer.state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        state["wrapper"] = {
            "num_updates": self.num_updates,
            "phase": self._phase,
            "last_step_updated": self.last_step_updated,
            "rng": self.rng.state_dict(),
            "clean_grads": [self._clean.get(p) for p in params] if self._clean else None,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "base_optimizer" not in state_dict or "wrapper" not in state_dict:
            raise ValueError(
                f"this state dict was not made by {type(self).__name__}.state_dict(): "
                "it lacks the 'base_optimizer' and 'wrapper' entries"
            )
        state_dict = dict(state_dict)
        base = state_dict.pop("base_optimizer")
        wrapper = state_dict.pop("wrapper")
        super().load_state_dict(state_dict)
        self.base_optimizer.load_state_dict(base)
        self.base_optimizer.param_groups = self.param_groups
        self.num_updates = int(wrapper["num_updates"])
        self._phase = int(wrapper["phase"])
        self.last_step_updated = bool(wrapper["last_step_updated"])
        self.rng.load_state_dict(wrapper["rng"])
        self._perturbed = []
        self._cancel = None
        self._clean = {}
        if wrapper["clean_grads"] is not None:
            params = [p for group in self.param_groups for p in group["params"]]
            for p, grad in zip(params, wrapper["clean_grads"]):
                if grad is not None:
                    self._clean[p] = grad.to(device=p.device, dtype=p.dtype).clone()

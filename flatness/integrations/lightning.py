r"""Every :mod:`flatness.optim` method under Lightning's automatic optimization.

Lightning calls ``optimizer.step(closure)`` once per accumulation window; a
plain two-pass optimizer there goes wrong two ways: with
``accumulate_grad_batches=k`` the closure only covers the last micro-batch
(the other ``k - 1`` were once silently dropped; ``step`` now refuses the
accumulated gradients), and a per-update LR scheduler steps twice per update
with ``MARWP(mix_batches="alternate")``.
:class:`FlatnessMixin` fixes both in the LightningModule, keeping the
torch.optim contract (Lightning still calls ``optimizer.step(closure)``
through its precision plugin, so its step counters, hooks and checkpoints
work as usual)::

    class Net(FlatnessMixin, L.LightningModule):   # the mixin first
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            opt = MARWP(self.parameters(), torch.optim.SGD, lr=0.1, model=self, mix_batches="alternate")
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

What is computed. Let a window be the micro-batches :math:`B_1..B_k`
(``k = accumulate_grad_batches``; the last window of an epoch may be
shorter) and :math:`L_i` the loss ``training_step`` returns on :math:`B_i`.
The mixin keeps the window's batches (``on_train_batch_start``), skips
Lightning's own backward passes over :math:`B_1..B_{k-1}` (their forward
still runs, once, wasted; it updates no BatchNorm running statistics and
leaves the global RNG state as it found it), and hands the optimizer a
closure that *sweeps* the window:
forward + backward of :math:`L_i / k` for every :math:`i` in order, the last
through Lightning's own closure. So every call of the closure yields
:math:`\nabla \frac1k \sum_i L_i` at the current weights, and

* SAM / ASAM / m-(A)RWP ``"same"``: two sweeps per window, at :math:`w` and at
  :math:`w + \epsilon` (:math:`\epsilon` from the first sweep's gradient);
* RWP / ARWP: one sweep, at :math:`w + \epsilon`;
* m-(A)RWP ``"alternate"``: the clean sweep on window :math:`t`, the perturbed
  sweep on window :math:`t + 1`, one update per two windows;

exactly what a plain loop computes with ``opt.step(closure)`` whose closure
backpropagates :math:`L_i / k` over the same micro-batches (tests/integrations).
With ``k = 1`` nothing is re-run: the closure is Lightning's.

Schedulers: ``lr_scheduler_step`` steps a scheduler only after a call that
updated the weights (``optimizer.last_step_updated``), so ``interval="step"``
means per update for every method. Lightning's ``global_step`` still counts
``optimizer.step`` calls (two per update in ``"alternate"`` mode).

Mixed precision: ``precision="bf16-mixed"`` works as is (autocast in every
pass). ``"16-mixed"`` needs a ``GradScaler`` that the optimizer steps itself:
build the optimizer with ``grad_scaler=self.trainer.precision_plugin.scaler``.
DDP: the window's first ``k - 1`` backward passes run under the strategy's
``block_backward_sync``; the gradient is all-reduced once per sweep.
Gradient clipping (``gradient_clip_val``) runs after every pass, i.e. on the
clean gradient before :math:`\epsilon` and on the gradient that is applied.
:class:`~flatness.optim.DeltaSAM` (per-sample closure) is not supported here:
use manual optimization with its closure. Details: docs/integrations.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from flatness.integrations._batch import to_device
from flatness.integrations._optional import require
from flatness.optim import DeltaSAM, PerturbedOptimizer, disable_running_stats

L = require("lightning.pytorch", "lightning")

__all__ = ["CurvatureCallback", "FlatnessMixin"]


def _raw(optimizer: Any) -> Any:
    """The optimizer inside a ``LightningOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "_optimizer", optimizer)


def _step_loss(output: Any) -> Tensor | None:
    """The loss of a ``training_step`` output: a tensor, ``{"loss": ...}`` or None (skip)."""
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "loss" in output:
        return output["loss"]
    raise TypeError(f"training_step must return a Tensor, a dict with 'loss', or None; got {type(output).__name__}")


class _WindowClosure:
    """Forward + backward of ``loss_i / k`` over the kept micro-batches; the last through Lightning's closure."""

    def __init__(self, module: Any, window: list[tuple[Any, int]], optimizer: Any, lightning_closure: Any) -> None:
        self.module, self.window, self.optimizer, self.lightning_closure = module, window, optimizer, lightning_closure

    def __call__(self) -> Any:
        trainer = self.module.trainer
        strategy, k = trainer.strategy, trainer.accumulate_grad_batches
        block = getattr(strategy, "block_backward_sync", contextlib.nullcontext)
        self.module._flatness_sweeping = True
        try:
            for batch, batch_idx in self.window[:-1]:
                with block():
                    loss = _step_loss(strategy.training_step(batch, batch_idx))
                    if loss is not None:
                        strategy.backward(loss / k, self.optimizer)
            return self.lightning_closure()
        finally:
            self.module._flatness_sweeping = False


class FlatnessMixin:
    """LightningModule mixin: :mod:`flatness.optim` methods under automatic optimization.

    Put it before ``LightningModule`` in the bases. It overrides
    ``on_train_batch_start`` (keeps the micro-batch; an override of yours must
    call ``super().on_train_batch_start(batch, batch_idx)``), ``on_train_batch_end``
    (likewise), ``backward``, ``optimizer_step`` and ``lr_scheduler_step``; with any other optimizer
    (or with manual optimization) they do what Lightning does. See the module
    docs for what is computed.
    """

    _flatness_window: list[tuple[Any, int]]
    _flatness_sweeping: bool = False

    def _flatness_optimizer(self) -> PerturbedOptimizer | None:
        if not getattr(self, "automatic_optimization", False) or getattr(self, "_trainer", None) is None:
            return None
        optimizers = self.trainer.optimizers
        raw = _raw(optimizers[0]) if len(optimizers) == 1 else None
        return raw if isinstance(raw, PerturbedOptimizer) else None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        if self._flatness_optimizer() is not None:
            self._flatness_end_discarded_pass()
            k = self.trainer.accumulate_grad_batches
            if batch_idx % k == 0 or not hasattr(self, "_flatness_window"):
                self._flatness_window = []
            self._flatness_window.append((batch, batch_idx))
            if (batch_idx + 1) % k != 0 and batch_idx + 1 != self.trainer.num_training_batches:
                self._flatness_discarded = _DiscardedPass(self)  # Lightning's own pass; the sweep redoes it
        return super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._flatness_end_discarded_pass()  # also when training_step returned None (no backward)
        return super().on_train_batch_end(outputs, batch, batch_idx)  # type: ignore[misc]

    def _flatness_end_discarded_pass(self) -> None:
        discarded = getattr(self, "_flatness_discarded", None)
        if discarded is not None:
            discarded.close()
            self._flatness_discarded = None

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        if not self._flatness_sweeping and self._flatness_optimizer() is not None:
            self._flatness_end_discarded_pass()
            return  # Lightning's own pass over a micro-batch; the window sweep redoes it
        super().backward(loss, *args, **kwargs)  # type: ignore[misc]

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        raw = self._flatness_optimizer()
        if raw is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)  # type: ignore[misc]
        if isinstance(raw, DeltaSAM):
            raise TypeError(
                "DeltaSAM's closure returns per-sample losses, which Lightning's automatic optimization cannot "
                "provide; use manual optimization (self.automatic_optimization = False) and call opt.step(closure)"
            )
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and raw.grad_scaler is not scaler:
            raise ValueError(
                f"precision={self.trainer.precision!r} scales the loss; build {type(raw).__name__} with "
                "grad_scaler=self.trainer.precision_plugin.scaler so that it unscales and steps once per update"
            )
        self._flatness_end_discarded_pass()
        window = getattr(self, "_flatness_window", [])
        if not window or window[-1][1] != batch_idx:
            raise RuntimeError(
                "FlatnessMixin did not see this batch: an on_train_batch_start override must call "
                "super().on_train_batch_start(batch, batch_idx)"
            )
        self._flatness_window = []
        raw.zero_grad(set_to_none=True)  # what the previous update left (Lightning zeroes inside its closure)
        if scaler is not None:  # the optimizer steps and updates the scaler; Lightning must not
            with _skipped_scaler_step(self.trainer.precision_plugin):
                optimizer.step(closure=_WindowClosure(self, window, raw, optimizer_closure))
            return None
        optimizer.step(closure=_WindowClosure(self, window, raw, optimizer_closure))
        return None

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        raw = self._flatness_optimizer()
        if raw is not None and not raw.last_step_updated:
            return  # the first call of an "alternate" pair: no update, no scheduler step
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)


class _DiscardedPass:
    """Lightning's own forward over a micro-batch that the window sweep redoes leaves no trace.

    BatchNorm running statistics are not updated and the global RNG state
    (dropout) is put back afterwards, so the sweep sees the same statistics
    and draws the same random numbers as a plain loop that never ran this pass.
    """

    def __init__(self, module: Any) -> None:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(disable_running_stats(module))
        self._cpu = torch.get_rng_state()
        self._cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def close(self) -> None:
        torch.set_rng_state(self._cpu)
        if self._cuda is not None:
            torch.cuda.set_rng_state_all(self._cuda)
        self._stack.close()


@contextlib.contextmanager
def _skipped_scaler_step(plugin: Any) -> Any:
    """Under ``16-mixed``, run the optimizer's own step with its ``grad_scaler`` instead of the plugin's.

    Lightning's AMP plugin would call the closure once and then
    ``scaler.step(optimizer)`` (a step without a closure). Here the plugin's
    ``optimizer_step`` is replaced, for one call, by the plain one
    (``optimizer.step(closure)``); the optimizer unscales, steps and updates
    the scaler itself.
    """
    from lightning.pytorch.plugins.precision import Precision

    original = plugin.optimizer_step
    plugin.optimizer_step = lambda optimizer, model, closure, **kw: Precision.optimizer_step(plugin, optimizer, model, closure, **kw)
    try:
        yield
    finally:
        plugin.optimizer_step = original


class CurvatureCallback(L.Callback):
    r"""lambda_max (and optionally the trace) on a fixed batch every ``every`` weight updates.

    The measurement is :class:`flatness.training.tracking.CurvatureTracker`,
    the code behind ``flatness train --track-curvature``: Lanczos on the
    Hessian of the mean loss over ``batch`` (model in eval mode), warm-started
    from the previous top eigenvector; with ``trace=True`` also Hutch++.
    Updates are counted from the optimizer's ``last_step_updated`` (the first
    call of an ``"alternate"`` pair does not count). Each row goes to every
    logger of the trainer (``log_metrics`` under ``curvature/``) and to
    :attr:`rows`; it is measured on global rank 0 only.

    Args:
        batch: the fixed analysis batch, ``(x, y)`` for an ``(output, target)``
            loss, or whatever ``loss_fn`` takes.
        every: updates between measurements.
        trace: also estimate the trace.
        loss_fn: ``loss(output, target)`` (default cross-entropy) or a
            :class:`flatness.losses.ModelLoss` ``fn(model, batch)``.
        **tracker_kwargs: passed on to ``CurvatureTracker`` (e.g. a cost budget).

    Attributes:
        tracker: the tracker (its ``rows`` and ``state_dict()``).
        updates: weight updates seen so far.
    """

    def __init__(self, batch: Any, every: int = 100, *, trace: bool = False, loss_fn: Any = None, **tracker_kwargs: Any) -> None:
        from flatness.training.tracking import CurvatureTracker

        if every < 1:
            raise ValueError(f"Invalid every value: {every} (expected an integer >= 1)")
        kwargs = dict(tracker_kwargs)
        if loss_fn is not None:
            kwargs["loss_fn"] = loss_fn
        self.tracker = CurvatureTracker(every, trace, batch, **kwargs)
        self.updates = 0
        self._last_global_step = 0

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.tracker.rows

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._last_global_step:
            return  # a micro-batch inside an accumulation window: no optimizer step yet
        self._last_global_step = trainer.global_step
        if not getattr(_raw(trainer.optimizers[0]), "last_step_updated", True):
            return
        self.updates += 1
        if not self.tracker.due(self.updates) or not trainer.is_global_zero:
            return
        was_training = pl_module.training
        device = next(pl_module.parameters()).device
        self.tracker.batch = to_device(self.tracker.batch, device)
        row = self.tracker.measure(pl_module, self.updates)
        pl_module.train(was_training)
        metrics = {f"curvature/{k}": v for k, v in row.items() if k != "step"}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self.updates)

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict(), "updates": self.updates, "global_step": self._last_global_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict["tracker"])
        self.updates = int(state_dict["updates"])
        self._last_global_step = int(state_dict["global_step"])


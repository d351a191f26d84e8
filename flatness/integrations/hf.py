r"""The two-pass :mod:`flatness.optim` methods under Hugging Face ``transformers.Trainer``.

The Trainer runs forward + backward per micro-batch in ``training_step`` and
then calls ``optimizer.step()`` without a closure, which a method that needs
a second pass at :math:`w + \epsilon` cannot serve.
:class:`FlatnessTrainer` is a drop-in ``Trainer`` that runs the update
inside ``training_step`` instead::

    opt = SAM(model.parameters(), torch.optim.AdamW, lr=5e-4, rho=0.05, model=model)
    trainer = FlatnessTrainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None),
                              callbacks=[CurvatureCallback(fixed_batch, every=50)])
    trainer.train()

What is computed. The Trainer gathers a window of ``gradient_accumulation_steps``
micro-batches :math:`B_1..B_k` per update. ``FlatnessTrainer.training_step``
keeps the micro-batches; at the last one it calls ``opt.step(closure)``,
where the closure runs ``Trainer.training_step`` (the Trainer's own forward,
loss scaling - by ``num_items_in_batch`` or by :math:`k` - autocast and
``accelerator.backward``) over the whole window, the first :math:`k - 1` under
``accelerator.no_sync``. Each call of the closure thus yields the window's
gradient at the current weights: SAM / ASAM / m-(A)RWP ``"same"`` sweep the
window at :math:`w` and at :math:`w + \epsilon`, RWP / ARWP once at
:math:`w + \epsilon`, and m-(A)RWP ``"alternate"`` takes the clean gradient
from window :math:`t` and the perturbed one from window :math:`t + 1`. This
is a plain loop with ``opt.step(closure)`` over the same windows
(tests/integrations/test_hf.py). The earlier micro-batches return a zero
loss to the Trainer, the last one the window's loss, so the logged loss is
unchanged.

The optimizer the Trainer sees is a thin ``torch.optim.Optimizer`` over the
same parameter groups and state whose ``step()`` (no closure) only confirms
that the update was made; ``state_dict`` is the method's. The LR scheduler
is wrapped in :class:`~flatness.optim.StepOnUpdate`, so it steps per weight
update (``"alternate"``: the Trainer's ``global_step`` counts windows, two per
update). ``max_grad_norm`` clipping runs after the update (on the gradient that
was applied; it changes nothing). Mixed precision: ``bf16=True`` (tested);
``fp16=True`` (a GradScaler) is refused in one line.
:class:`~flatness.optim.DeltaSAM` is not supported here.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from flatness.integrations._batch import to_device
from flatness.integrations._optional import require
from flatness.losses import ModelLoss
from flatness.optim import DeltaSAM, PerturbedOptimizer, StepOnUpdate

transformers = require("transformers", "hf")

__all__ = ["CurvatureCallback", "FlatnessTrainer", "model_loss"]


class _StepDoneInTrainingStep(torch.optim.Optimizer):
    """The optimizer the Trainer steps: the same groups and state; the update already happened.

    ``step(closure)`` passes on to the method; ``step()`` without a closure
    only checks that :meth:`FlatnessTrainer.training_step` made the update.
    """

    def __init__(self, optimizer: PerturbedOptimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        super().__init__(params, {})  # fills a private list; the groups and state read are the method's
        self.optimizer = optimizer
        self.pending = False

    # The method's own groups and state, also after its load_state_dict() replaced the group dicts
    # (accelerate reloads the state dict when it prepares the optimizer).
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        inner = self.__dict__.get("optimizer")
        return inner.param_groups if inner is not None else self.__dict__.setdefault("_init_groups", [])

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.__dict__["_init_groups"] = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        inner = self.__dict__.get("optimizer")
        return inner.state if inner is not None else self.__dict__.setdefault("_init_state", {})

    @state.setter
    def state(self, value: Any) -> None:
        self.__dict__["_init_state"] = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        inner = self.__dict__.get("optimizer")
        return inner.defaults if inner is not None else self.__dict__.setdefault("_init_defaults", {})

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.__dict__["_init_defaults"] = value

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if closure is not None:
            return self.optimizer.step(closure)
        if not self.pending:
            raise RuntimeError(
                f"{type(self.optimizer).__name__} was stepped without a closure and FlatnessTrainer.training_step "
                "made no update since the last step; the update runs inside FlatnessTrainer.training_step"
            )
        self.pending = False
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)


class FlatnessTrainer(transformers.Trainer):
    """``transformers.Trainer`` that runs :mod:`flatness.optim` methods (see the module docs).

    Pass the method as ``optimizers=(opt, scheduler_or_None)`` or build it in
    an override of ``create_optimizer``; any other optimizer trains as with
    the plain Trainer.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flatness_window: list[Any] = []
        self._wrap_optimizer()

    @property
    def flatness_optimizer(self) -> PerturbedOptimizer | None:
        """The method's optimizer, or None when the Trainer runs another optimizer."""
        opt = getattr(self, "_flatness_step", None)
        return opt.optimizer if opt is not None else None

    def _wrap_optimizer(self) -> None:
        self._flatness_step = getattr(self, "_flatness_step", None)
        opt = self.optimizer
        if isinstance(opt, PerturbedOptimizer):
            if isinstance(opt, DeltaSAM):
                raise TypeError("DeltaSAM's closure returns per-sample losses; FlatnessTrainer runs the loss-returning methods only")
            self._flatness_step = _StepDoneInTrainingStep(opt)
            self.optimizer = self._flatness_step

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if model is None:  # transformers < 5 has no model argument
            super().create_optimizer()
        else:
            super().create_optimizer(model)
        self._wrap_optimizer()
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        raw = self.flatness_optimizer
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if raw is not None and not plateau and not isinstance(scheduler, StepOnUpdate):
            self.lr_scheduler = scheduler = StepOnUpdate(scheduler, raw)
        return scheduler

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with the curvature rows measured since the last one (to every ``report_to``)."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, CurvatureCallback) and callback.pending is not None:
                logs.update(callback.pending)
                callback.pending = None
        super().log(logs, *args, **kwargs)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        raw = self.flatness_optimizer
        if raw is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if getattr(self.accelerator, "scaler", None) is not None:
            raise ValueError(
                "FlatnessTrainer does not run fp16 with a GradScaler (the Trainer would step and update the scaler "
                "a second time after the method's update); use bf16=True, or a plain loop with grad_scaler="
            )
        self._flatness_window.append(inputs)
        if not self.accelerator.sync_gradients:  # more micro-batches of this window follow
            return torch.zeros((), device=self.args.device)
        window, self._flatness_window = self._flatness_window, []

        def closure() -> Tensor:
            total = torch.zeros((), device=self.args.device)
            for i, batch in enumerate(window):
                sync = contextlib.nullcontext() if i == len(window) - 1 else self.accelerator.no_sync(model)
                with sync:
                    total = total + transformers.Trainer.training_step(self, model, batch, num_items_in_batch)
            return total

        raw.zero_grad(set_to_none=True)
        loss = raw.step(closure)
        self._flatness_step.pending = True  # type: ignore[union-attr]
        return loss.detach()


def _hf_loss(model: nn.Module, batch: Any) -> Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(*batch)
    loss = out["loss"] if isinstance(out, dict) else out.loss
    if loss is None:
        raise ValueError("the model returned no loss for the analysis batch: include the labels in it")
    return loss


#: ``model(**batch).loss`` as a :class:`flatness.losses.ModelLoss` (the analysis batch holds the labels).
model_loss = ModelLoss(_hf_loss, "hf:model(**batch).loss")


class CurvatureCallback(transformers.TrainerCallback):
    r"""lambda_max (and optionally the trace) of the model's loss on a fixed batch every ``every`` updates.

    The measurement is :class:`flatness.training.tracking.CurvatureTracker`
    (``flatness train --track-curvature``): Lanczos on the Hessian of
    ``loss_fn`` over ``batch`` (model in eval mode), warm-started from the
    previous top eigenvector. Updates are counted after each optimizer step
    whose method reports ``last_step_updated`` (plain optimizers: every
    step). Each row, with ``curvature/``-prefixed keys and ``update``, is
    logged at that step: under :class:`FlatnessTrainer` it joins the Trainer's
    own log (so every ``report_to`` integration and ``trainer_state.json`` get
    it); under a plain ``Trainer`` it is appended to ``state.log_history``.
    It also goes to ``logger`` (anything with ``log(metrics, step)``, e.g.
    :class:`flatness.loggers.tensorboard.TensorBoardLogger`) and
    stays in :attr:`rows`. Measured on the main process only.

    Args:
        batch: the fixed analysis batch, e.g. ``{"input_ids": ..., "labels": ...}``.
        every: updates between measurements.
        trace: also estimate the trace (Hutch++).
        loss_fn: default :data:`model_loss` (``model(**batch).loss``).
        logger: optional ``log(metrics, step)`` sink.
        **tracker_kwargs: passed on to ``CurvatureTracker`` (e.g. a cost budget).
    """

    def __init__(self, batch: Any, every: int = 100, *, trace: bool = False, loss_fn: Any = None, logger: Any = None, **tracker_kwargs: Any) -> None:
        from flatness.training.tracking import CurvatureTracker

        if every < 1:
            raise ValueError(f"Invalid every value: {every} (expected an integer >= 1)")
        self.tracker = CurvatureTracker(every, trace, batch, loss_fn=loss_fn or model_loss, **tracker_kwargs)
        self.logger = logger
        self.updates = 0
        self.pending: dict[str, Any] | None = None

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.tracker.rows

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        inner = optimizer
        while hasattr(inner, "optimizer") and not isinstance(inner, PerturbedOptimizer):
            inner = inner.optimizer  # AcceleratedOptimizer -> FlatnessTrainer's step -> the method
        if not getattr(inner, "last_step_updated", True):
            return
        self.updates += 1
        if model is None or not self.tracker.due(self.updates) or not state.is_world_process_zero:
            return
        was_training = model.training
        device = next(model.parameters()).device
        self.tracker.batch = to_device(self.tracker.batch, device)
        row = self.tracker.measure(model, self.updates)
        model.train(was_training)
        metrics = {f"curvature/{k}": v for k, v in row.items() if k != "step"}
        self.pending = {**metrics, "update": self.updates}
        control.should_log = True  # FlatnessTrainer.log adds the row to this step's log
        if self.logger is not None:
            self.logger.log(metrics, self.updates)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.pending is not None:  # a plain Trainer: record the row in the history on its own
            state.log_history.append({**self.pending, "step": state.global_step})
            self.pending = None


r"""Loss and accuracy at many points :math:`\theta + \sum_k c_k \delta_k` on fixed batches.

Every point sees exactly the same samples, with the model in eval mode, so
BatchNorm uses the running statistics of the centre checkpoint (its buffers
are never touched; only parameters move). The loss of a point is the sample
mean over all batches,

.. math::

    L(c) = \frac{1}{N} \sum_b n_b\, \ell_b(\theta + \textstyle\sum_k c_k \delta_k),

with :math:`\ell_b` the (mean-reduced) loss of batch :math:`b`, accumulated in
float64; the accuracy is in percent.

Two ways to evaluate a chunk of points:

- ``"loop"``: one forward per point and batch. The point's weights are
  written into the model's own parameters in place (three fused
  ``torch._foreach_*`` calls, no per-point module re-parametrization) and the
  centre is copied back at the end, so the model leaves exactly as it came.
  Each batch is used for every point of the chunk before the next batch.
  On the CPU a large batch is cut into micro-batches whose largest
  activation fits in about 1 MiB (:func:`micro_batch_size`, a function of
  the model's shapes only, so a resumed run cuts the same way): the layers
  then work in cache instead of streaming megabytes per layer through memory.
  On the 1-D CNN of ``benchmarks/surface.py`` (two micro-batches of 551 and
  449 samples) this is 1.15x faster than one 1,000-sample forward at best and
  2.4x at the median on a loaded machine, where the large forward often falls
  into a slow mode.
- ``"vmap"``: ``torch.func.vmap`` over a stack of the chunk's weight sets
  through ``torch.func.functional_call``, one batched forward per data batch.
  Pays on GPUs, where a small model leaves the device idle between kernel
  launches; on CPUs vmap's grouped convolutions are slower than the loop (see
  ``benchmarks/surface.py``).

``"auto"`` picks ``"vmap"`` on CUDA and ``"loop"`` elsewhere. A model that
vmap cannot batch (data-dependent Python control flow, ``.item()``, in-place
updates of captured tensors, dynamic output shapes: torch raises a
``RuntimeError`` starting with ``"vmap:"`` or ``"Batching rule not
implemented"``) is evaluated with the loop instead; :func:`vmap_failure`
names the reason so the caller can say so. Any other error propagates: it is
a bug, not a reason to change method. A :class:`~flatness.losses.ModelLoss`
(``fn(model, batch)``) calls the model itself, so it is evaluated with the
loop only, and its accuracy is NaN.

:func:`evaluate_points_reference` is the plain per-point loop of
loss-landscape (Li et al. 2018): write the weights into the model, run all
batches with a ``.item()`` per batch, next point. It is the slow,
obviously-correct reference of the tests.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from flatness.losses import ModelLoss, batch_size

LossFn = Callable[[Tensor, Tensor], Tensor] | ModelLoss
Batches = Sequence[Any]

METHODS = ("auto", "vmap", "loop")

# The errors torch.func.vmap raises for a model it cannot batch (torch/_functorch).
VMAP_UNSUPPORTED = re.compile(r"^(vmap: |Batching rule not implemented)")


def resolve_method(method: str, device: torch.device | str, loss_fn: Any = None) -> str:
    """``"auto"`` -> ``"vmap"`` on CUDA, ``"loop"`` otherwise (and for a ModelLoss); other names are checked and returned."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected 'auto', 'vmap' or 'loop'")
    if method == "auto":
        return "vmap" if torch.device(device).type == "cuda" and not isinstance(loss_fn, ModelLoss) else "loop"
    return method


def point_weights(center: Sequence[Tensor], directions: Sequence[Sequence[Tensor]], coord: Sequence[float] | Tensor) -> list[Tensor]:
    r"""The weights :math:`\theta + c_0 \delta_0 (+ c_1 \delta_1)` of one point.

    The coordinates are cast to each parameter's dtype first and the terms
    are added in direction order; :func:`stacked_weights` computes the same
    numbers for many points at once.
    """
    out = []
    for i, w in enumerate(center):
        acc = w
        for k, d in enumerate(directions):
            acc = acc + d[i] * torch.as_tensor(float(coord[k]), dtype=w.dtype, device=w.device)
        out.append(acc)
    return out


def stacked_weights(center: Sequence[Tensor], directions: Sequence[Sequence[Tensor]], coords: Tensor) -> list[Tensor]:
    """Weights of ``K`` points stacked along a new first dimension: ``(K, *shape)`` per parameter."""
    out = []
    for i, w in enumerate(center):
        c = coords.to(device=w.device, dtype=w.dtype)
        acc = w.unsqueeze(0)
        for k, d in enumerate(directions):
            acc = acc + d[i].unsqueeze(0) * c[:, k].view(-1, *([1] * w.ndim))
        out.append(acc)
    return out


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its training flags after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, t in flags:
            m.training = t


def _names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def _classifies(loss_fn: Any, batch: Any) -> bool:
    """Accuracy is defined: a classic ``(output, target)`` loss with integer class targets."""
    return not isinstance(loss_fn, ModelLoss) and not batch[1].is_floating_point()


def _batch_stats(model: nn.Module, loss_fn: Any, batch: Any) -> tuple[Tensor, Tensor]:
    """Mean loss and number of correct predictions (NaN without accuracy) of ``model`` on one batch."""
    if isinstance(loss_fn, ModelLoss):
        return loss_fn(model, batch), torch.tensor(float("nan"))
    out = model(batch[0])
    y = batch[1]
    correct = (out.argmax(-1) == y).sum() if _classifies(loss_fn, batch) else torch.tensor(float("nan"))
    return loss_fn(out, y), correct


def evaluate_points(
    model: nn.Module,
    batches: Batches,
    center: Sequence[Tensor],
    directions: Sequence[Sequence[Tensor]],
    coords: Tensor | np.ndarray,
    *,
    loss_fn: LossFn = nn.functional.cross_entropy,
    method: str = "loop",
    micro_batch: int | None = None,
) -> Tensor:
    """Loss and accuracy (%) at each of ``K`` points, on all ``batches``.

    Args:
        model: the network (``center`` are its parameters); evaluated in
            eval mode with its buffers (BatchNorm running statistics) as they
            are. ``"loop"`` writes each point into the parameters and copies
            ``center`` back at the end; ``"vmap"`` never touches them.
        batches: ``(x, y)`` pairs on the model's device (anything a ModelLoss takes).
        center: the centre weights, one tensor per parameter.
        directions: one or two directions (lists of tensors like ``center``).
        coords: ``(K, len(directions))`` coordinates.
        loss_fn: mean-reduced ``loss_fn(logits, y)`` or a :class:`~flatness.losses.ModelLoss`.
        method: ``"vmap"`` or ``"loop"`` (``"auto"`` is resolved with the
            device of ``center``).
        micro_batch: ``"loop"``: forward at most this many samples at once
            (``(x, y)`` batches only); default: all of a batch on CUDA,
            :func:`micro_batch_size` on the CPU.

    Returns:
        A ``(K, 2)`` float64 tensor (on the model's device): loss, accuracy in %
        (NaN where accuracy is not defined).
    """
    if not center:
        raise ValueError("the model has no parameters")
    device = center[0].device
    method = resolve_method(method, device, loss_fn)
    coords = torch.as_tensor(np.asarray(coords) if not isinstance(coords, Tensor) else coords, dtype=torch.float64)
    if coords.ndim != 2 or coords.shape[1] != len(directions):
        raise ValueError(f"coords must have shape (K, {len(directions)}), got {tuple(coords.shape)}")
    if len(_names(model)) != len(center):
        raise ValueError(f"center has {len(center)} tensors but the model has {len(_names(model))} parameters")
    if method == "vmap" and isinstance(loss_fn, ModelLoss):
        raise ValueError("a ModelLoss calls the model itself and cannot be vmapped; use method 'loop'")
    with torch.no_grad(), eval_mode(model):
        if method == "vmap":
            loss_sum, correct = _vmap_sums(model, batches, center, directions, coords, loss_fn)
        else:
            if micro_batch is None and device.type == "cpu":
                micro_batch = micro_batch_size(model, batches, loss_fn)
            loss_sum, correct = _loop_sums(model, _micro_batches(batches, micro_batch), center, directions, coords, loss_fn)
    total = sum(batch_size(b) for b in batches)
    return torch.stack([loss_sum / total, 100.0 * correct / total], dim=1)


def micro_batch_size(model: nn.Module, batches: Batches, loss_fn: Any = None, *, budget_bytes: int = 1 << 20) -> int | None:
    """Samples per forward so that the largest activation of one forward fits in ``budget_bytes`` (CPU caches).

    Measured with forward hooks on one sample of the first batch (so it
    depends on the model's shapes only, never on timing); None for batches a
    :class:`~flatness.losses.ModelLoss` takes, which are not cut.
    """
    if isinstance(loss_fn, ModelLoss) or not isinstance(batches[0], (tuple, list)) or not isinstance(batches[0][0], Tensor):
        return None
    sizes: list[int] = []

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, Tensor):
            sizes.append(out.numel() * out.element_size())

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad(), eval_mode(model):
            model(batches[0][0][:1])
    finally:
        for h in handles:
            h.remove()
    return int(max(1, budget_bytes // max(max(sizes, default=1), 1)))


def _micro_batches(batches: Batches, size: int | None) -> list[Any]:
    """``(x, y)`` batches cut into pieces of at most ``size`` samples (others unchanged)."""
    if size is None:
        return list(batches)
    out: list[Any] = []
    for batch in batches:
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Tensor) and batch_size(batch) > size:
            out.extend(zip(batch[0].split(size), batch[1].split(size)))
        else:
            out.append(batch)
    return out


def _loop_sums(model: nn.Module, batches: Batches, center: Sequence[Tensor], directions: Sequence[Sequence[Tensor]],
               coords: Tensor, loss_fn: Any) -> tuple[Tensor, Tensor]:
    r"""Per-point sums :math:`\sum_b n_b \ell_b` and correct counts, weights written in place.

    Each point's weights are :math:`\theta + c_0 \delta_0 + c_1 \delta_1`,
    written with ``_foreach_copy_`` / ``_foreach_add_``; the centre is copied
    back in ``finally``, so the parameters end bitwise as they began.
    """
    params = list(model.parameters())
    # the centre must survive the in-place writes: never let it alias the parameters it is copied into
    center = [c.clone() if c.data_ptr() == p.data_ptr() else c for c, p in zip(center, params)]
    cols = coords.tolist()
    losses: list[list[Tensor]] = [[] for _ in cols]
    corrects: list[list[Tensor]] = [[] for _ in cols]
    try:
        for batch in batches:  # each batch once, every point of the chunk on it
            n = batch_size(batch)
            for k, coord in enumerate(cols):
                torch._foreach_copy_(params, list(center))
                for c, direction in zip(coord, directions):
                    torch._foreach_add_(params, list(direction), alpha=c)
                loss, corr = _batch_stats(model, loss_fn, batch)
                losses[k].append(loss.double() * n)
                corrects[k].append(corr.double())
    finally:
        torch._foreach_copy_(params, list(center))
    loss_sum = torch.stack([torch.stack(v).sum() for v in losses]).to(center[0].device)
    correct = torch.stack([torch.stack(v).sum() for v in corrects]).to(center[0].device)
    return loss_sum, correct


def _vmap_sums(model: nn.Module, batches: Batches, center: Sequence[Tensor], directions: Sequence[Sequence[Tensor]],
               coords: Tensor, loss_fn: Any) -> tuple[Tensor, Tensor]:
    """Per-point sums through ``vmap(functional_call)`` over the stacked weights of the chunk."""
    names = _names(model)
    device = center[0].device
    K = coords.shape[0]
    loss_sum = torch.zeros(K, dtype=torch.float64, device=device)
    correct = torch.zeros(K, dtype=torch.float64, device=device)

    def one(params: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        out = functional_call(model, params, (x,))
        return loss_fn(out, y), (out.argmax(-1) == y).sum()

    batched = vmap(one, in_dims=(0, None, None))
    stacked = dict(zip(names, stacked_weights(center, directions, coords)))
    for batch in batches:
        loss, corr = batched(stacked, batch[0], batch[1])
        loss_sum += loss.double() * batch_size(batch)
        correct += corr.double() if _classifies(loss_fn, batch) else float("nan")
    return loss_sum, correct


def vmap_failure(
    model: nn.Module,
    batches: Batches,
    center: Sequence[Tensor],
    directions: Sequence[Sequence[Tensor]],
    *,
    loss_fn: LossFn = nn.functional.cross_entropy,
) -> str | None:
    """Why ``model`` cannot be evaluated with ``vmap`` (tried on two samples at the centre), or None.

    Only the errors torch's vmap raises for what it cannot batch count
    (``RuntimeError`` messages starting with ``"vmap: "`` or ``"Batching
    rule not implemented"``: data-dependent control flow, ``.item()``,
    in-place updates of captured tensors, dynamic shapes). Anything else is
    re-raised.
    """
    if isinstance(loss_fn, ModelLoss):
        return "a model-level loss (module:callable) calls the model itself"
    x, y = batches[0][0], batches[0][1]
    probe = [(x[:2], y[:2])]
    coords = torch.zeros(2, len(directions), dtype=torch.float64)
    try:
        evaluate_points(model, probe, center, directions, coords, loss_fn=loss_fn, method="vmap")
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if VMAP_UNSUPPORTED.search(first):
            return first
        raise
    return None


def auto_chunk_size(
    model: nn.Module,
    batches: Batches,
    method: str,
    *,
    budget_bytes: int | None = None,
    max_points: int = 64,
) -> int:
    """Points per chunk (a chunk is evaluated, gathered and written as one unit).

    For ``"loop"`` it only sets how often results are written: about 65,536
    sample evaluations per chunk (65 points for 1,000 samples), between 1
    and 256 points. For ``"vmap"`` it is also bounded by memory: the stacked
    weights plus every module's output for one batch, per point, must fit in
    ``budget_bytes`` (half the free GPU memory, or 1 GiB on the CPU).
    """
    samples = sum(batch_size(b) for b in batches)
    if method != "vmap":
        return int(max(1, min(256, 65536 // max(samples, 1))))
    return _vmap_chunk_size(model, batches, budget_bytes, max_points)


def _vmap_chunk_size(model: nn.Module, batches: Batches, budget_bytes: int | None, max_points: int) -> int:
    """Points per vmap chunk: stacked weights plus every module's output per point within the budget."""
    device = next(model.parameters()).device
    if budget_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget_bytes = free // 2
        else:
            budget_bytes = 1 << 30
    sizes: list[int] = []

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, Tensor):
            sizes.append(out.numel() * out.element_size())

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad(), eval_mode(model):
            model(batches[0][0])
    finally:
        for h in handles:
            h.remove()
    per_point = sum(sizes) + sum(p.numel() * p.element_size() for p in model.parameters())
    return int(max(1, min(max_points, budget_bytes // max(per_point, 1))))


def evaluate_points_reference(
    model: nn.Module,
    batches: Batches,
    center: Sequence[Tensor],
    directions: Sequence[Sequence[Tensor]],
    coords: Tensor | np.ndarray,
    *,
    loss_fn: LossFn = nn.functional.cross_entropy,
) -> np.ndarray:
    """The plain per-point loop (loss-landscape's scheme): set weights, run every batch, next point.

    Writes each point's weights into ``model`` (restored at the end) and
    accumulates ``loss.item() * batch_size`` on the host. Slow and obviously
    correct; used by the tests and the benchmark.

    Returns:
        A ``(K, 2)`` float64 array: loss, accuracy in % (NaN where not defined).
    """
    coords = np.asarray(coords.cpu() if isinstance(coords, Tensor) else coords, dtype=np.float64)
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    out_rows = np.zeros((coords.shape[0], 2))
    try:
        with torch.no_grad(), eval_mode(model):
            for k, coord in enumerate(coords):
                for p, w in zip(params, point_weights(center, directions, coord.tolist())):
                    p.copy_(w)
                total, loss_sum, correct = 0, 0.0, 0.0
                for batch in batches:
                    n = batch_size(batch)
                    if isinstance(loss_fn, ModelLoss):
                        loss_sum += loss_fn(model, batch).item() * n
                        correct = float("nan")
                    else:
                        out = model(batch[0])
                        loss_sum += loss_fn(out, batch[1]).item() * n
                        correct += int((out.argmax(-1) == batch[1]).sum().item()) if _classifies(loss_fn, batch) else float("nan")
                    total += n
                out_rows[k] = (loss_sum / total, 100.0 * correct / total)
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
    return out_rows

r"""Loss and accuracy at many points :math:`\theta + \sum_k c_k \delta_k` on fixed batches.

Every point sees exactly the same samples, with the model in eval mode, so
BatchNorm uses the running statistics of the centre checkpoint (its buffers
are never touched; only parameters move). The loss of a point is the sample
mean over all batches,

.. math::

    L(c) = \frac{1}{N} \sum_b n_b\, \ell_b(\theta + \textstyle\sum_k c_k \delta_k),

with :math:`\ell_b` the (mean-reduced) loss of batch :math:`b`, accumulated in
float64; the accuracy is in percent.

Two ways to evaluate a chunk of points, both through
``torch.func.functional_call`` (the module's own parameters are never
modified):

- ``"vmap"``: ``torch.func.vmap`` over a stack of the chunk's weight sets,
  one batched forward per data batch. Pays on GPUs, where a small model
  leaves the device idle between kernel launches.
- ``"loop"``: one forward per point and batch. On CPUs the forward of a
  1,000-sample batch is already compute bound and vmap's grouped
  convolutions are slower than a loop (see ``benchmarks/surface.py``).

``"auto"`` picks ``"vmap"`` on CUDA and ``"loop"`` elsewhere, and falls back
to ``"loop"`` when the model cannot be vmapped (see :func:`vmap_works`).
:func:`evaluate_points_reference` is the plain per-point loop of
loss-landscape (Li et al. 2018): write the weights into the model, run all
batches, next point. It is the slow, obviously-correct reference of the tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

LossFn = Callable[[Tensor, Tensor], Tensor]
Batches = Sequence[tuple[Tensor, Tensor]]

METHODS = ("auto", "vmap", "loop")


def resolve_method(method: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"vmap"`` on CUDA, ``"loop"`` otherwise; other names are checked and returned."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected 'auto', 'vmap' or 'loop'")
    if method == "auto":
        return "vmap" if torch.device(device).type == "cuda" else "loop"
    return method


def point_weights(center: Sequence[Tensor], directions: Sequence[Sequence[Tensor]], coord: Sequence[float] | Tensor) -> list[Tensor]:
    r"""The weights :math:`\theta + c_0 \delta_0 (+ c_1 \delta_1)` of one point.

    The coordinates are cast to each parameter's dtype first and the terms
    are added in direction order; :func:`stacked_weights` computes exactly the
    same numbers for many points at once.
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


def _correct(out: Tensor, y: Tensor) -> Tensor:
    return (out.argmax(-1) == y).sum()


def evaluate_points(
    model: nn.Module,
    batches: Batches,
    center: Sequence[Tensor],
    directions: Sequence[Sequence[Tensor]],
    coords: Tensor | np.ndarray,
    *,
    loss_fn: LossFn = nn.functional.cross_entropy,
    method: str = "loop",
) -> Tensor:
    """Loss and accuracy (%) at each of ``K`` points, on all ``batches``.

    Args:
        model: the network; its parameters are replaced through
            ``functional_call`` (never modified), its buffers (BatchNorm
            running statistics) are used as they are, in eval mode.
        batches: ``(x, y)`` pairs on the model's device.
        center: the centre weights, one tensor per parameter.
        directions: one or two directions (lists of tensors like ``center``).
        coords: ``(K, len(directions))`` coordinates.
        loss_fn: mean-reduced loss ``loss_fn(logits, y)``.
        method: ``"vmap"`` or ``"loop"`` (``"auto"`` is resolved with the
            device of ``center``).

    Returns:
        A ``(K, 2)`` float64 tensor (on the model's device): loss, accuracy in %.
    """
    if not center:
        raise ValueError("the model has no parameters")
    device = center[0].device
    method = resolve_method(method, device)
    coords = torch.as_tensor(np.asarray(coords) if not isinstance(coords, Tensor) else coords, dtype=torch.float64)
    if coords.ndim != 2 or coords.shape[1] != len(directions):
        raise ValueError(f"coords must have shape (K, {len(directions)}), got {tuple(coords.shape)}")
    K = coords.shape[0]
    names = _names(model)
    if len(names) != len(center):
        raise ValueError(f"center has {len(center)} tensors but the model has {len(names)} parameters")
    total = sum(int(y.shape[0]) for _, y in batches)
    loss_sum = torch.zeros(K, dtype=torch.float64, device=device)
    correct = torch.zeros(K, dtype=torch.float64, device=device)
    with torch.no_grad(), eval_mode(model):
        if method == "vmap":

            def one(params: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
                out = functional_call(model, params, (x,))
                return loss_fn(out, y), _correct(out, y)

            batched = vmap(one, in_dims=(0, None, None))
            stacked = dict(zip(names, stacked_weights(center, directions, coords)))
            for x, y in batches:
                loss, corr = batched(stacked, x, y)
                loss_sum += loss.double() * int(y.shape[0])
                correct += corr.double()
        else:
            sets = [dict(zip(names, point_weights(center, directions, coords[k].tolist()))) for k in range(K)]
            for x, y in batches:  # each batch once, every point of the chunk on it
                for k, params in enumerate(sets):
                    out = functional_call(model, params, (x,))
                    loss_sum[k] += loss_fn(out, y).double() * int(y.shape[0])
                    correct[k] += _correct(out, y).double()
    return torch.stack([loss_sum / total, 100.0 * correct / total], dim=1)


def vmap_works(
    model: nn.Module,
    batches: Batches,
    center: Sequence[Tensor],
    directions: Sequence[Sequence[Tensor]],
    *,
    loss_fn: LossFn = nn.functional.cross_entropy,
) -> bool:
    """Whether ``model`` can be evaluated with ``vmap`` (tried on two samples at the centre).

    Models with data-dependent Python control flow, in-place updates of
    captured tensors or ops without a batching rule raise inside vmap; they
    are evaluated point by point instead.
    """
    x, y = batches[0]
    probe = [(x[:2], y[:2])]
    coords = torch.zeros(2, len(directions), dtype=torch.float64)
    try:
        evaluate_points(model, probe, center, directions, coords, loss_fn=loss_fn, method="vmap")
    except Exception:  # noqa: BLE001 - any failure means "not vmappable": fall back to the loop
        return False
    return True


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
    samples = sum(int(y.shape[0]) for _, y in batches)
    if method != "vmap":
        return int(max(1, min(256, 65536 // max(samples, 1))))
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
        A ``(K, 2)`` float64 array: loss, accuracy in %.
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
                total, loss_sum, correct = 0, 0.0, 0
                for x, y in batches:
                    out = model(x)
                    loss_sum += loss_fn(out, y).item() * y.shape[0]
                    correct += int((out.argmax(-1) == y).sum().item())
                    total += y.shape[0]
                out_rows[k] = (loss_sum / total, 100.0 * correct / total)
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
    return out_rows

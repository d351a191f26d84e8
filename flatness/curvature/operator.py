r"""The loss Hessian as a linear operator on the flattened parameters.

For a model :math:`f_\theta`, a mean-reduced loss :math:`\ell` and batches
:math:`B_1, \dots, B_m` of sizes :math:`n_1, \dots, n_m` (:math:`N = \sum n_b`),
the operator applies

.. math::

    H v = \sum_{b=1}^{m} \frac{n_b}{N} \nabla^2_\theta \ell(f_\theta(X_b), Y_b)\, v ,

the Hessian of the mean loss over all :math:`N` samples, exactly (not an
average of per-batch estimates with unequal weights). The model runs in eval
mode, so BatchNorm layers use their running statistics, dropout is off and
the loss is a deterministic function of :math:`\theta` (``bn_mode = "eval"``).

The loss is either a classic ``loss_fn(output, target)`` on batches
``(inputs, targets)`` or a :class:`flatness.losses.ModelLoss`
``fn(model, batch)`` on batches of any form (tuple, list, dict), weighted by
:func:`flatness.losses.batch_size`.

Which parameters: those that require grad (frozen ones are held fixed and
excluded), each tensor once (tied weights, e.g. an embedding shared with the
output layer, are one block of the Hessian: ``model.named_parameters()``
lists them once and ``functional_call`` keeps them tied). A parameter the
loss does not reach gets zero rows and columns.

Attention: every loss evaluation runs under
``torch.nn.attention.sdpa_kernel([SDPBackend.MATH])`` (restored afterwards),
because the fused CPU/GPU kernels of ``scaled_dot_product_attention`` (used by
``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``) have no double
backward and no forward-mode derivative. The math kernel computes the same
function with ordinary, twice-differentiable operations.

The operator follows the curvlinops convention (Dangel et al.): it is not a
matrix but an object with ``shape``, ``dtype``, ``device`` and ``@``
(matrix-vector and matrix-matrix products), with :meth:`HessianOperator.to_scipy`
as a bridge to ``scipy.sparse.linalg``.

Backends (how one product :math:`Hv` is computed; see
``benchmarks/hessian.py`` for the timings that chose the default):

``"graph"`` (default)
    Pearlmutter's double backward, :math:`Hv = \nabla_\theta (\nabla_\theta
    \ell^\top v)`, with the first-order gradient graph of every batch built
    once and kept (``create_graph=True``), so each product is a single
    backward pass through the cached graphs (1.3x the cost of a gradient for
    an MLP, 2.3x for a 1-D CNN, on CPU). Graphs that do not fit the memory
    budget (``graph_memory``) are rebuilt on every product, as in
    ``"backward"``.
``"backward"``
    The same double backward, rebuilding forward and gradient graph on every
    product (least memory; 2.2x and 3.2x a gradient).
``"jvp"``
    ``torch.func.jvp`` of ``torch.func.grad`` (forward-over-reverse; 4-7x).
``"linearize"``
    ``torch.func.linearize`` of ``torch.func.grad``, traced once per batch
    (0.3-0.5 s) and replayed (as fast as ``"graph"``, but the tracing fails
    on models with data-dependent control flow).

Under ``torch.distributed`` (when a process group is initialized) each rank
keeps its own contiguous share of the batches and every product is summed
over ranks with one ``all_reduce``; the weights use the global sample count,
so every rank holds the same operator. Every rank must then apply the
operator to the same vectors, in the same order (the estimators do, given
the same ``seed``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torch.nn.attention import SDPBackend, sdpa_kernel

from flatness.distributed import shard_indices
from flatness.losses import LossFn, ModelLoss, batch_size

Batch = Any  # (inputs, targets) for an (output, target) loss; anything a ModelLoss reads

BACKENDS = ("graph", "backward", "jvp", "linearize")

# Share of the free memory that cached gradient graphs may take by default;
# the rest is left to the estimators (a Lanczos basis is n x (ncv + 1)).
_GRAPH_MEMORY_SHARE = 0.5


class HessianOperator:
    r"""Symmetric linear operator :math:`v \mapsto Hv` of a model's mean loss.

    The Hessian is taken at the parameter values at construction time (the
    operator keeps its own copy), with the model in eval mode; the model and
    its gradients are left untouched.

    Args:
        model: the network; its parameters fix the device.
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced over the batch,
            or a :class:`flatness.losses.ModelLoss`.
        batches: an iterable of ``(inputs, targets)`` (or one such pair), or
            of any batches a ``ModelLoss`` reads; moved to the model's device
            once (floating tensors cast to ``dtype``).
        params: the parameters (objects or names from
            ``model.named_parameters()``) that span the operator's space;
            ``None`` for all parameters that require grad. The others are
            held fixed, which gives diagonal blocks of the full Hessian
            (e.g. one layer's).
        dtype: ``torch.float32`` or ``torch.float64`` (default: the
            parameters' dtype). In float64 the model runs on a float64 copy
            of its weights, buffers and floating inputs.
        backend: ``"graph"``, ``"backward"``, ``"jvp"`` or ``"linearize"``
            (module docstring).
        graph_memory: bytes that cached gradient graphs may take
            (``"graph"`` backend); default half the free device memory
            (host memory on CPU). Batches beyond it are recomputed on every
            product.
        distributed: shard the batches over the ranks of the initialized
            process group and all-reduce every product (default: when one is
            initialized). Every rank must pass the same batches.
        callback: called with ``hvp_count`` after every product (progress
            bars); must not touch the operator.
        batched: ``H @ V`` with a matrix ``V`` (a Lanczos block) runs its
            columns as one batched double backward (``"graph"`` and
            ``"backward"`` backends; :meth:`_matmat`) instead of one product
            after the other. Default: on CUDA, where one batched call keeps
            the device busy; on the CPU the vmapped backward measured
            0.9-1.8x slower than the loop (``benchmarks/hessian.py`` models).

    Raises:
        ValueError: unknown backend or dtype, no parameters, empty batches,
            parameters that are not in ``model``, ``distributed=True``
            without a process group.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
        >>> H = HessianOperator(model, nn.functional.cross_entropy, [(x, y)])
        >>> H.shape
        (8, 8)
        >>> (H @ torch.ones(8)).shape
        torch.Size([8])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Batch] | Batch,
        params: Iterable[nn.Parameter | str] | None = None,
        *,
        dtype: torch.dtype | None = None,
        backend: str = "graph",
        graph_memory: int | None = None,
        distributed: bool | None = None,
        callback: Callable[[int], None] | None = None,
        batched: bool | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
        self.model = model
        self.loss_fn = loss_fn
        self.backend = backend
        self.names = _select_params(model, params)
        named = dict(model.named_parameters())
        first = named[self.names[0]]
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype if dtype is None else dtype
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Unknown dtype {self.dtype}; expected torch.float32 or torch.float64")
        self.shapes = [named[k].shape for k in self.names]
        self.numels = [named[k].numel() for k in self.names]
        n = sum(self.numels)
        self.shape: tuple[int, int] = (n, n)
        self.bn_mode = "eval" if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else "none"
        self.hvp_count = 0
        self.callback = callback
        self.batched = self.device.type == "cuda" if batched is None else bool(batched)

        # The point of evaluation: our own leaves, plus the fixed rest of the state.
        chosen = set(self.names)
        self._theta = {k: named[k].detach().to(self.dtype, copy=True).requires_grad_(True) for k in self.names}
        self._const: dict[str, Tensor] = {k: _cast(p.detach(), self.dtype) for k, p in named.items() if k not in chosen}
        self._const.update({k: _cast(b.detach(), self.dtype) for k, b in model.named_buffers()})

        all_batches = _as_batch_list(batches, loss_fn)
        if not all_batches:
            raise ValueError("Expected at least one batch of (inputs, targets), got none")
        sizes = [batch_size(b) for b in all_batches]
        group = dist.is_available() and dist.is_initialized()
        if distributed and not group:
            raise ValueError("distributed=True needs an initialized torch.distributed process group")
        self.distributed = group if distributed is None else bool(distributed)
        self.world_size = dist.get_world_size() if self.distributed else 1
        rank = dist.get_rank() if self.distributed else 0
        own = shard_indices(len(all_batches), rank, self.world_size) if self.distributed else range(len(all_batches))
        # Every rank holds all batches here, so the global total needs no collective.
        self.num_samples = sum(sizes)
        self._batches = [_to_device(all_batches[j], self.device, self.dtype) for j in own]
        self._weights = [sizes[j] / self.num_samples for j in own]

        self._graph_memory = graph_memory
        self._cache: list[Any] | None = None  # per local batch: cached graph / linearized fn / None
        self.cached_batches = 0

    # ------------------------------------------------------------------ basics

    def __repr__(self) -> str:
        return (
            f"HessianOperator(shape={self.shape}, dtype={self.dtype}, device={self.device}, backend={self.backend!r}, "
            f"samples={self.num_samples}, bn_mode={self.bn_mode!r})"
        )

    @property
    def T(self) -> HessianOperator:  # noqa: N802 - numpy/scipy spelling
        """The operator itself (it is symmetric)."""
        return self

    def __matmul__(self, v: Tensor) -> Tensor:
        """``H @ v`` for a vector ``(n,)`` or a matrix ``(n, m)`` (column by column)."""
        if not isinstance(v, Tensor):
            raise TypeError(f"HessianOperator @ expects a torch.Tensor, got {type(v).__name__}")
        if v.ndim not in (1, 2) or v.shape[0] != self.shape[0]:
            raise ValueError(f"Expected a vector ({self.shape[0]},) or matrix ({self.shape[0]}, m), got shape {tuple(v.shape)}")
        v = v.to(device=self.device, dtype=self.dtype)
        if v.ndim == 1:
            return self._matvec(v)
        if v.shape[1] == 1 or not self.batched or self.backend not in ("graph", "backward"):
            return torch.stack([self._matvec(v[:, j]) for j in range(v.shape[1])], dim=1)
        return self._matmat(v)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` that calls this operator.

        Each product copies the vector from NumPy to the device and back;
        fine for interop and tests, not for speed.
        """
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.ascontiguousarray(x)).to(self.device, self.dtype)
            return (self @ t).cpu().numpy()

        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32
        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mv, dtype=np_dtype)

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (in ``self.names`` order) into one vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, v: Tensor) -> list[Tensor]:
        """Split a flat vector into per-parameter views (in ``self.names`` order)."""
        return [part.reshape(shape) for part, shape in zip(v.split(self.numels), self.shapes)]

    def parameters_vector(self) -> Tensor:
        """The point of evaluation as a flat vector."""
        return self.flatten([self._theta[k].detach() for k in self.names])

    def loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        """Mean loss over all batches and its flat gradient (one forward+backward pass)."""
        theta = list(self._theta.values())
        loss_total = torch.zeros((), dtype=self.dtype, device=self.device)
        grad_total = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        with _eval_mode(self.model), torch.enable_grad():
            for batch, w in zip(self._batches, self._weights):
                loss = self._loss(batch) * w
                grads = torch.autograd.grad(loss, theta, allow_unused=True)
                grad_total += self.flatten(_fill_none(grads, theta))
                loss_total += loss.detach()
        if self.distributed:
            dist.all_reduce(loss_total)
            dist.all_reduce(grad_total)
        return loss_total, grad_total

    # ------------------------------------------------------------------ products

    def _loss(self, batch: Batch, theta: dict[str, Tensor] | None = None) -> Tensor:
        state = {**self._const, **(self._theta if theta is None else theta)}
        return functional_loss(self.model, self.loss_fn, state, batch)

    def _matvec(self, v: Tensor) -> Tensor:
        cache = self._cache if self._cache is not None else self._build_cache()
        theta = list(self._theta.values())
        parts = self.unflatten(v)
        total = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        with _eval_mode(self.model), torch.enable_grad():
            if self.backend == "graph":
                cached = [g for g in cache if g is not None]
                if cached:
                    outputs = [t for g in cached for t in g]
                    hv = torch.autograd.grad(outputs, theta, grad_outputs=parts * len(cached), retain_graph=True, allow_unused=True)
                    total += self.flatten(_fill_none(hv, theta))
                for batch, w, g in zip(self._batches, self._weights, cache):
                    if g is None:
                        total += self._double_backward(batch, w, parts)
            elif self.backend == "backward":
                for batch, w in zip(self._batches, self._weights):
                    total += self._double_backward(batch, w, parts)
            elif self.backend == "jvp":
                tangent = dict(zip(self.names, parts))
                primal = {k: t.detach() for k, t in self._theta.items()}
                for batch, w in zip(self._batches, self._weights):
                    grad_fn = torch.func.grad(lambda th, b=batch, w=w: self._loss(b, th) * w)
                    with warnings.catch_warnings():
                        # torch's forward AD loads TorchScript decompositions on first use and warns about them
                        warnings.simplefilter("ignore", DeprecationWarning)
                        _, hv = torch.func.jvp(grad_fn, (primal,), (tangent,))
                    total += self.flatten([hv[k] for k in self.names])
            elif self.backend == "linearize":
                tangent = dict(zip(self.names, parts))
                for fn in cache:
                    hv = fn(tangent)
                    total += self.flatten([hv[k] for k in self.names])
            else:  # pragma: no cover - checked in __init__
                raise ValueError(f"Unknown backend {self.backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
        if self.distributed:
            dist.all_reduce(total)
        self.hvp_count += 1
        if self.callback is not None:
            self.callback(self.hvp_count)
        return total

    def _matmat(self, V: Tensor) -> Tensor:
        r"""``H V`` for ``V`` of shape ``(n, m)`` as ONE batched double backward per batch.

        ``torch.autograd.grad(..., is_grads_batched=True)`` runs the backward
        pass of :math:`\nabla_\theta \ell^\top v` for all ``m`` columns at
        once (vmap over the backward through the cached gradient graph), so a
        Lanczos block costs one call on a GPU. Counts ``m`` products.
        """
        cache = self._cache if self._cache is not None else self._build_cache()
        theta = list(self._theta.values())
        m = V.shape[1]
        rows = V.T.contiguous()  # (m, n)
        parts = [rows[:, a:b].reshape(m, *shape) for (a, b), shape in zip(_spans(self.numels), self.shapes)]  # per parameter (m, *shape)
        total = torch.zeros(m, self.shape[0], dtype=self.dtype, device=self.device)
        with _eval_mode(self.model), torch.enable_grad():
            graphs = list(cache) if self.backend == "graph" else [None] * len(self._batches)
            cached = [g for g in graphs if g is not None]
            if cached:
                outputs = [t for g in cached for t in g]
                hv = torch.autograd.grad(outputs, theta, grad_outputs=parts * len(cached), retain_graph=True, allow_unused=True, is_grads_batched=True)
                total += self._flatten_batched(hv, theta, m)
            for batch, w, g in zip(self._batches, self._weights, graphs):
                if g is None:
                    grads = self._grad_graph(batch, w)
                    hv = torch.autograd.grad(grads, theta, grad_outputs=parts, allow_unused=True, is_grads_batched=True)
                    total += self._flatten_batched(hv, theta, m)
        if self.distributed:
            dist.all_reduce(total)
        for _ in range(m):
            self.hvp_count += 1
            if self.callback is not None:
                self.callback(self.hvp_count)
        return total.T

    def _flatten_batched(self, hv: Sequence[Tensor | None], theta: Sequence[Tensor], m: int) -> Tensor:
        return torch.cat([(torch.zeros(m, t.numel(), dtype=self.dtype, device=self.device) if h is None else h.reshape(m, -1)) for h, t in zip(hv, theta)], dim=1)

    def _double_backward(self, batch: Batch, w: float, parts: list[Tensor]) -> Tensor:
        theta = list(self._theta.values())
        grads = self._grad_graph(batch, w)
        hv = torch.autograd.grad(grads, theta, grad_outputs=parts, allow_unused=True)
        return self.flatten(_fill_none(hv, theta))

    def _grad_graph(self, batch: Batch, w: float) -> list[Tensor]:
        """Weighted gradient of one batch, with its graph (``create_graph=True``)."""
        theta = list(self._theta.values())
        with torch.enable_grad():
            loss = self._loss(batch) * w
            grads = torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True)
        # A parameter the loss does not reach has zero gradient and zero Hessian
        # rows; a constant zero keeps the output list aligned with ``theta``.
        return [torch.zeros_like(t, requires_grad=True) if g is None else g for g, t in zip(grads, theta)]

    def _build_cache(self) -> list[Any]:
        cache: list[Any] = [None] * len(self._batches)
        with _eval_mode(self.model), torch.enable_grad():
            if self.backend == "graph" and self._batches:
                sizes = [batch_size(b) for b in self._batches]
                budget = _free_memory(self.device) * _GRAPH_MEMORY_SHARE if self._graph_memory is None else self._graph_memory
                per_sample = self._graph_bytes(self._batches[0]) / max(sizes[0], 1) if len(self._batches) > 1 or self._graph_memory is not None else 0.0
                used = 0.0
                for i, (batch, w) in enumerate(zip(self._batches, self._weights)):
                    need = per_sample * sizes[i]
                    if used + need > budget:
                        continue
                    used += need
                    cache[i] = self._grad_graph(batch, w)
            elif self.backend == "linearize":
                primal = {k: t.detach() for k, t in self._theta.items()}
                for i, (batch, w) in enumerate(zip(self._batches, self._weights)):
                    grad_fn = torch.func.grad(lambda th, b=batch, w=w: self._loss(b, th) * w)
                    with warnings.catch_warnings():
                        # torch.fx's constant folding inside linearize warns about its own graph
                        warnings.simplefilter("ignore", UserWarning)
                        _, cache[i] = torch.func.linearize(grad_fn, primal)
        self._cache = cache
        self.cached_batches = sum(c is not None for c in cache) if self.backend in ("graph", "linearize") else 0
        return cache

    def _graph_bytes(self, batch: Batch) -> float:
        """Bytes a cached gradient graph of ``batch`` holds (measured on a throwaway graph)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            graph = self._grad_graph(batch, 1.0)
            torch.cuda.synchronize(self.device)
            size = torch.cuda.memory_allocated(self.device) - before
            del graph
            return float(max(size, 0))
        total = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            graph = self._grad_graph(batch, 1.0)
        total += sum(g.numel() * g.element_size() for g in graph)
        del graph
        gc.collect()  # identity pack hooks can leave reference cycles
        return float(total)


# ---------------------------------------------------------------------- dense matrices


class MatrixOperator:
    """A dense symmetric matrix behind the operator interface (counts products).

    Lets every estimator run on an exact matrix, which is how the tests feed
    them known spectra.
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Expected a square matrix, got shape {tuple(matrix.shape)}")
        if not matrix.is_floating_point():
            raise TypeError(f"Expected a floating-point matrix, got dtype {matrix.dtype}")
        self.matrix = matrix
        self.shape: tuple[int, int] = (matrix.shape[0], matrix.shape[1])
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.hvp_count = 0

    def __matmul__(self, v: Tensor) -> Tensor:
        self.hvp_count += 1 if v.ndim == 1 else v.shape[1]
        return self.matrix @ v.to(self.dtype)


def as_operator(H: Any) -> Any:
    """Wrap a dense tensor in :class:`MatrixOperator`; pass operators through.

    Raises:
        TypeError: neither a tensor nor an object with ``shape`` and ``@``.
    """
    if isinstance(H, Tensor):
        return MatrixOperator(H)
    if hasattr(H, "shape") and hasattr(H, "__matmul__") and hasattr(H, "dtype") and hasattr(H, "device"):
        return H
    raise TypeError(f"Expected a torch.Tensor or an operator with shape, dtype, device and @, got {type(H).__name__}")


def dense_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch] | Batch,
    params: Iterable[nn.Parameter | str] | None = None,
    *,
    method: str = "func",
    chunk_size: int | None = 256,
) -> Tensor:
    r"""The full Hessian of the mean loss as a dense float64 matrix.

    A slow reference for tests and small models, in eval mode and weighted by
    :math:`n_b / N` like :class:`HessianOperator`.

    Args:
        model, loss_fn, batches, params: as :class:`HessianOperator`.
        method: ``"func"``: per batch, ``torch.func.jacrev(torch.func.grad(loss))``
            of the flattened parameters (reverse-over-reverse, vectorised over
            ``chunk_size`` basis vectors at a time), independent of the
            operator's code; memory ``chunk_size`` copies of one batch's
            activations. ``"columns"``: :math:`H e_i` for every basis vector
            with a float64 :class:`HessianOperator` (``n`` products; faster
            for convolutions on CPU, whose vectorised double backward is slow).
        chunk_size: basis vectors per vectorised call (``"func"``).

    Returns:
        Tensor of shape ``(n, n)``, float64, on the model's device, in the
        order of ``model.named_parameters()`` (restricted to ``params``).

    Raises:
        ValueError: unknown method, no batches.
    """
    if method == "columns":
        op = HessianOperator(model, loss_fn, batches, params, dtype=torch.float64)
        eye = torch.eye(op.shape[0], dtype=torch.float64, device=op.device)
        return torch.stack([op @ eye[i] for i in range(op.shape[0])], dim=1)
    if method != "func":
        raise ValueError(f"Unknown method {method!r}; expected 'func' or 'columns'")
    names = _select_params(model, params)
    named = dict(model.named_parameters())
    chosen = set(names)
    device = named[names[0]].device
    theta0 = torch.cat([named[k].detach().to(torch.float64).reshape(-1) for k in names])
    shapes = [named[k].shape for k in names]
    numels = [named[k].numel() for k in names]
    const = {k: _cast(p.detach(), torch.float64) for k, p in named.items() if k not in chosen}
    const.update({k: _cast(b.detach(), torch.float64) for k, b in model.named_buffers()})
    all_batches = _as_batch_list(batches, loss_fn)
    if not all_batches:
        raise ValueError("Expected at least one batch of (inputs, targets), got none")
    total = sum(batch_size(b) for b in all_batches)
    H = torch.zeros(theta0.numel(), theta0.numel(), dtype=torch.float64, device=device)
    with _eval_mode(model):
        for batch in all_batches:
            moved = _to_device(batch, device, torch.float64)

            def loss(flat: Tensor, b: Batch = moved) -> Tensor:
                state = {**const, **{k: p.view(s) for k, p, s in zip(names, flat.split(numels), shapes)}}
                return functional_loss(model, loss_fn, state, b)

            H += torch.func.jacrev(torch.func.grad(loss), chunk_size=chunk_size)(theta0) * (batch_size(batch) / total)
    return H


# ---------------------------------------------------------------------- helpers


def _select_params(model: nn.Module, params: Iterable[nn.Parameter | str] | None) -> list[str]:
    named = dict(model.named_parameters())
    if params is None:
        names = [k for k, p in named.items() if p.requires_grad]
    else:
        by_id = {id(p): k for k, p in named.items()}
        names = []
        for p in params:
            if isinstance(p, str):
                if p not in named:
                    raise ValueError(f"Parameter {p!r} is not in the model; expected one of {', '.join(named)}")
                names.append(p)
            elif isinstance(p, Tensor):
                if id(p) not in by_id:
                    raise ValueError(f"A parameter of shape {tuple(p.shape)} is not in the model")
                names.append(by_id[id(p)])
            else:
                raise TypeError(f"Expected parameters or parameter names, got {type(p).__name__}")
        order = {k: i for i, k in enumerate(named)}
        names = sorted(set(names), key=order.__getitem__)
    if not names:
        raise ValueError("Expected at least one parameter for the Hessian, got none")
    return names


class _ModelLossModule(nn.Module):
    """``fn(model, batch)`` as a module, so ``functional_call`` can substitute the model's parameters."""

    def __init__(self, model: nn.Module, fn: ModelLoss) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Batch) -> Tensor:
        return self.fn(self.model, batch)


def functional_loss(model: nn.Module, loss_fn: LossFn, state: dict[str, Tensor], batch: Batch) -> Tensor:
    """Mean loss of one batch with the model's parameters and buffers replaced by ``state``.

    Runs under the math SDPA kernel (module docstring), whose attention is
    twice differentiable and has forward-mode derivatives.
    """
    with sdpa_kernel([SDPBackend.MATH]):
        if isinstance(loss_fn, ModelLoss):
            wrapped = _ModelLossModule(model, loss_fn)
            return torch.func.functional_call(wrapped, {f"model.{k}": v for k, v in state.items()}, (batch,))
        out = torch.func.functional_call(model, state, (batch[0],))
        return loss_fn(out, batch[1])


def _as_batch_list(batches: Iterable[Batch] | Batch, loss_fn: LossFn | None = None) -> list[Batch]:
    if isinstance(loss_fn, ModelLoss):
        return [batches] if isinstance(batches, dict) else list(batches)  # any batch form; the loss reads it
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], Tensor) and isinstance(batches[1], Tensor):
        return [batches]  # one (inputs, targets) pair
    out = []
    for b in batches:
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise TypeError(f"Expected batches of (inputs, targets), got {type(b).__name__}")
        out.append((b[0], b[1]))
    return out


def _to_device(batch: Batch, device: torch.device, dtype: torch.dtype) -> Batch:
    """``batch`` with every tensor on ``device`` and floating ones in ``dtype`` (tuples, lists, dicts)."""
    if isinstance(batch, Tensor):
        return _cast(batch.to(device), dtype)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device, dtype) for v in batch)
    return batch


def _spans(numels: Sequence[int]) -> Iterator[tuple[int, int]]:
    start = 0
    for k in numels:
        yield start, start + k
        start += k


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _fill_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; every module's own flag is restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _free_memory(device: torch.device) -> float:
    """Free bytes on ``device`` (host memory for CPU); a guess when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return float(4 << 30)

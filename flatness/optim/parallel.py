r"""Two-role parallel m-(A)RWP on ``torch.distributed``.

Li et al., TMLR 2024 (official ``train_mrwp_parallel.py``): m-(A)RWP's two
gradients are independent, so with an even number of processes half of them
(even group ranks, the *clean* role) compute :math:`\nabla L(w)` and the other
half (odd group ranks, the *perturbed* role) compute
:math:`\nabla L(w + \epsilon)`, each on its own batch, at the cost of one
forward-backward per process. A single all-reduce forms

.. math::

    g = \frac{\lambda}{n_p} \sum_{r\ \text{perturbed}} g_r
      + \frac{1-\lambda}{n_c} \sum_{r\ \text{clean}} g_r

and every rank applies the same base-optimizer step, so the weights stay
identical without DDP (do not wrap the model in ``DistributedDataParallel``).

Which samples each gradient sees is the caller's choice: every rank's closure
runs on that rank's own batch. With one rank per role, update :math:`t` is

.. math::

    g_t = \lambda\, \nabla L(w_t + \epsilon_t;\ B_t^{(1)})
        + (1-\lambda)\, \nabla L(w_t;\ B_t^{(0)}),

:math:`B_t^{(r)}` the batch rank :math:`r` holds at update :math:`t`, two
*different* batches, and :math:`\epsilon_t` draw :math:`t` of noise stream 0.
That is exactly :class:`~flatness.optim.MARWP` with ``mix_batches="alternate"``
fed :math:`B_t^{(0)}` then :math:`B_t^{(1)}` (tests/optim/test_optim_parallel.py);
it is *not* ``MARWP(mix_batches="same")``, which takes both gradients on one
batch.

* The official script gives each rank its own ``DistributedSampler`` batch of
  ``-b`` samples (an update reads two batches, so it doubles the epochs); the
  odd rank adds filter-wise noise (RWP: no ARWP accumulator there) and scales
  its loss by :math:`2\lambda`, the even rank by :math:`2(1-\lambda)`, and DDP's
  gradient average gives the same :math:`g_t`.
* ``flatness train --parallel-roles`` under ``torchrun --nproc_per_node 2``:
  ``--batch-size`` is the global batch :math:`B_t` (the next ``--batch-size``
  samples of the data epoch's permutation) and rank :math:`r` takes its
  positions :math:`r, r+2, r+4, \dots`: :math:`B_t^{(0)}` (clean) the even
  positions, :math:`B_t^{(1)}` (perturbed) the odd ones; the learning rate
  follows the per-update schedule. tests/cli/test_train_distributed.py checks
  such a run against a single-process transcription of :math:`g_t` to 1e-6.

What the same all-reduce also carries, so all ranks hold the same state:

* ARWP: the perturbed ranks' squared row sums (averaged over perturbed ranks,
  unscaled by ``GradScaler``); every rank updates the same accumulator.
* BatchNorm (``model`` given, ``buffer_sync="average"``): perturbed passes run
  under :func:`~flatness.optim.disable_running_stats`; afterwards every floating buffer
  becomes the mean over the clean ranks (integer buffers such as
  ``num_batches_tracked`` travel in a second, tiny all-reduce).
* Noise: counter-based generators (:mod:`flatness.optim.rng`) with one stream per
  perturbed rank, so ``state_dict()`` of *any* rank resumes every rank exactly.

Use from a training loop (``torchrun --nproc_per_node 2 train.py``)::

    dist.init_process_group("nccl")          # or "gloo"
    model = build().to(device)               # no DDP
    opt = ParallelMARWP(model.parameters(), torch.optim.SGD, lr=0.1,
                        momentum=0.9, sigma=0.015, lam=0.5, eta=0.1,
                        beta=0.99, model=model)
    sampler = DistributedSampler(train_set)  # a different batch on each rank
    for x, y in loader:
        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)             # same contract as MARWP
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._checks import check_choice, check_nonnegative, check_unit_closed, check_unit_half_open
from .bn import disable_running_stats
from .noise import accumulate_fisher_, fisher_like, row_sq_sums
from .perturbation import RandomPerturbation
from .rng import NoiseGenerators
from .wrapper import Closure, ParamsT, PerturbedOptimizer

BUFFER_SYNC = ("average", "none")


def split_roles(world_size: int) -> tuple[list[int], list[int]]:
    """Group ranks of the two roles: ``(clean, perturbed)`` = (even, odd) ranks.

    Raises:
        ValueError: ``world_size`` is not a positive even number.
    """
    if world_size < 2 or world_size % 2:
        raise ValueError(
            f"two-role parallel m-(A)RWP needs an even world size >= 2, got {world_size}"
        )
    return list(range(0, world_size, 2)), list(range(1, world_size, 2))


class _Bucket:
    """One flat tensor per (device, dtype) and views of it for each entry."""

    def __init__(self, like: Tensor, sizes: list[int]) -> None:
        self.flat = torch.empty(sum(sizes), dtype=like.dtype, device=like.device)
        self.views = list(self.flat.split(sizes))


class ParallelMARWP(PerturbedOptimizer):
    r"""Two-role parallel m-ARWP (``eta=0`` or :class:`ParallelMRWP`: m-RWP).

    Args:
        params: parameters or parameter groups (identical on every rank).
        base_optimizer: optimizer class, e.g. ``torch.optim.SGD``.
        sigma, lam, eta, beta: as for :class:`~flatness.optim.MARWP` (``lam`` is read from
            each param group).
        model: the network (recommended): BatchNorm handling and buffer sync.
        process_group: the group to run over (default: the world).
        seed: noise seed; perturbed rank ``k`` uses stream ``k``. Must be the
            same on all ranks (``None``: ``torch.initial_seed()``, so seed all
            ranks alike).
        buffer_sync: ``"average"`` (floating buffers = mean over clean ranks) or
            ``"none"``.
        sync_init: broadcast parameters and buffers from group rank 0 at
            construction, so all ranks start from the same weights.
        foreach, grad_scaler, **base_kwargs: as for
            :class:`~flatness.optim.wrapper.PerturbedOptimizer`. With ``grad_scaler`` the
            closure backpropagates ``grad_scaler.scale(loss)``; an overflow on
            any rank makes every rank skip the step.

    Attributes:
        role: ``"clean"`` or ``"perturbed"``.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        ValueError: odd world size or invalid hyperparameters.

    Every parameter that requires a gradient takes part in the all-reduce
    (a missing gradient counts as zero). The returned loss is this rank's
    (clean or perturbed) loss.
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
        model: nn.Module | None = None,
        process_group: dist.ProcessGroup | None = None,
        seed: int | None = None,
        buffer_sync: str = "average",
        sync_init: bool = True,
        foreach: bool | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        _adaptive: bool = True,
        **base_kwargs: Any,
    ) -> None:
        check_nonnegative("sigma", sigma)
        check_unit_closed("lam", lam)
        method_defaults: dict[str, Any] = {"sigma": sigma, "lam": lam}
        if _adaptive:
            check_nonnegative("eta", eta)
            check_unit_half_open("beta", beta)
            method_defaults.update(eta=eta, beta=beta)
        check_choice("buffer_sync", buffer_sync, BUFFER_SYNC)
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ParallelMARWP needs an initialised torch.distributed process group "
                "(call dist.init_process_group first, e.g. under torchrun)"
            )
        super().__init__(
            params,
            base_optimizer,
            perturbation=RandomPerturbation(adaptive=_adaptive),
            method_defaults=method_defaults,
            model=model,
            seed=seed,
            foreach=foreach,
            grad_scaler=grad_scaler,
            **base_kwargs,
        )
        self.process_group = process_group
        self.group_rank = dist.get_rank(process_group)
        clean, perturbed = split_roles(dist.get_world_size(process_group))
        self.n_clean, self.n_perturbed = len(clean), len(perturbed)
        self.role = "perturbed" if self.group_rank % 2 else "clean"
        self.rng = NoiseGenerators(self.rng.seed, stream=self.group_rank // 2)
        self.buffer_sync = buffer_sync
        self._buckets: dict[tuple[torch.device, torch.dtype], _Bucket] = {}
        self._layout: list[tuple[str, Tensor, tuple[torch.device, torch.dtype], int]] = []
        if sync_init:
            self._broadcast_initial_state()

    # ------------------------------------------------------------ setup
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _buffers(self) -> list[Tensor]:
        if self.model is None or self.buffer_sync == "none":
            return []
        return list(self.model.buffers())

    @torch.no_grad()
    def _broadcast_initial_state(self) -> None:
        src = dist.get_global_rank(self.process_group, 0) if self.process_group else 0
        tensors = [p for group in self.param_groups for p in group["params"]]
        if self.model is not None:
            tensors += list(self.model.buffers())
        for t in tensors:
            dist.broadcast(t, src=src, group=self.process_group)

    def _build_layout(self) -> None:
        """Fixed packing order: gradients, ARWP row sums, buffers."""
        entries: list[tuple[str, Tensor, Tensor]] = []  # (kind, tensor, shape source)
        for p in self._params():
            entries.append(("grad", p, p))
        if self.perturbation.adaptive:
            for p in self._params():
                state = self.state[p]
                if "fisher" not in state:
                    state["fisher"] = fisher_like(p)
                entries.append(("sq", p, state["fisher"]))
        for b in self._buffers():
            entries.append(("buffer", b, b))
        sizes: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        likes: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._layout = []
        for kind, tensor, shape_src in entries:
            key = (shape_src.device, shape_src.dtype)
            sizes.setdefault(key, []).append(shape_src.numel())
            likes.setdefault(key, shape_src)
            self._layout.append((kind, tensor, key, len(sizes[key]) - 1))
        self._buckets = {key: _Bucket(likes[key], sizes[key]) for key in sizes}

    # ------------------------------------------------------------ the step
    def _weights(self, group: dict[str, Any]) -> float:
        lam = group["lam"]
        if self.role == "perturbed":
            return lam / self.n_perturbed
        return (1.0 - lam) / self.n_clean

    @torch.no_grad()
    def _pack(self, sq: dict[Tensor, Tensor]) -> None:
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        clean = self.role == "clean"
        for kind, tensor, key, i in self._layout:
            view = self._buckets[key].views[i]
            if kind == "grad":
                grad = tensor.grad
                if grad is None:
                    view.zero_()
                else:
                    torch.mul(grad.reshape(-1), self._weights(group_of[tensor]), out=view)
            elif kind == "sq":
                if clean:
                    view.zero_()
                else:
                    torch.mul(sq[tensor].reshape(-1), 1.0 / self.n_perturbed, out=view)
            elif tensor.is_floating_point():
                if clean:
                    torch.mul(tensor.reshape(-1), 1.0 / self.n_clean, out=view)
                else:
                    view.zero_()
            else:
                if clean:
                    view.copy_(tensor.reshape(-1))
                else:
                    view.zero_()

    @torch.no_grad()
    def _unpack(self) -> None:
        fisher, sums = {}, {}
        for kind, tensor, key, i in self._layout:
            view = self._buckets[key].views[i]
            if kind == "grad":
                tensor.grad = view.view(tensor.shape)
            elif kind == "sq":
                fisher[tensor] = self.state[tensor]["fisher"]
                sums[tensor] = view.view(fisher[tensor].shape)
            elif tensor.is_floating_point():
                tensor.copy_(view.view(tensor.shape))
            else:
                tensor.copy_(view.view(tensor.shape).div(self.n_clean, rounding_mode="floor"))
        if fisher:
            for group in self.param_groups:
                ps = [p for p in group["params"] if p in fisher]
                if ps:
                    accumulate_fisher_(
                        [fisher[p] for p in ps],
                        [sums[p] for p in ps],
                        beta=group["beta"],
                        foreach=self._foreach(group, ps),
                    )

    def _local_sq(self) -> dict[Tensor, Tensor]:
        """Unscaled squared row sums of this (perturbed) rank's gradients."""
        if not self.perturbation.adaptive or self.role == "clean":
            return {}
        params = [p for p in self._params() if p.grad is not None]
        sq = dict(zip(params, row_sq_sums([p.grad for p in params])))
        inv_scale = self._inv_scale()
        if inv_scale is not None:
            factor = inv_scale * inv_scale
            for s in sq.values():
                s.mul_(factor.to(s.device))
        for p in self._params():
            if p not in sq:
                sq[p] = torch.zeros_like(self.state[p]["fisher"])
        return sq

    def _no_closure_message(self) -> str:
        name = type(self).__name__
        return (
            f"{name}.step() needs a closure that runs forward + backward and returns the loss: "
            "each rank runs its own pass (at w or at w + eps) inside step(), so a trainer that "
            "back-propagates and then calls optimizer.step() (Hugging Face Trainer, Lightning "
            "with manual backward) cannot drive it; pass step(closure) (the flatness.integrations "
            f"hf / lightning adapters and first_step() / second_step() serve MARWP, not {name})"
        )

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One update: this rank's pass, one all-reduce, the same step everywhere.

        Raises:
            TypeError: no closure.
            ValueError: gradients already accumulated in ``.grad`` (see
                docs/methods.md, "Gradient accumulation").

        If the closure raises (``KeyboardInterrupt`` included), this rank's
        weights and state are restored as for :meth:`PerturbedOptimizer.step`
        and the exception propagates before the all-reduce: the other ranks
        then wait in theirs, so either every rank skips the step together (the
        same exception on all ranks, e.g. a batch too large everywhere) or the
        job must be torn down.
        """
        if closure is None:
            raise TypeError(self._no_closure_message())
        self._refuse_accumulated()
        closure = torch.enable_grad()(closure)
        if not self._buckets:
            self._build_layout()  # creates the accumulators: before the undo point
        undo = self._save_undo()
        self.last_step_updated = False
        self.zero_grad(set_to_none=True)
        try:
            if self.role == "perturbed":
                self._perturb()  # advances the noise counter
                with disable_running_stats(self.model):
                    loss = closure()
            else:
                self.rng.next_draw()  # keep the draw counter equal on all ranks
                loss = closure()
        except BaseException:
            self._rollback(undo)
            raise
        if self._perturbed:
            self._restore()
            self._perturbed = []
        self._pack(self._local_sq())
        # Buckets are created in the same order on every rank (layout order).
        for bucket in self._buckets.values():
            dist.all_reduce(bucket.flat, group=self.process_group)
        self._unpack()
        self._base_step()
        self.num_updates += 1
        self.last_step_updated = True
        self._mark_grads()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load any rank's checkpoint: the state is identical on all ranks except
        the noise stream, which stays this rank's own."""
        super().load_state_dict(state_dict)
        self.rng.stream = self.group_rank // 2

    def first_step(self) -> None:
        raise NotImplementedError("ParallelMARWP has no first_step(); use step(closure)")

    def cancel_step(self) -> None:
        raise NotImplementedError(
            "ParallelMARWP has no cancel_step(): step(closure) undoes itself when the closure raises"
        )

    def second_step(self) -> None:
        raise NotImplementedError("ParallelMARWP has no second_step(); use step(closure)")


class ParallelMRWP(ParallelMARWP):
    """Two-role parallel m-RWP (no ARWP scaling); see :class:`ParallelMARWP`."""

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[torch.optim.Optimizer],
        *,
        sigma: float = 0.015,
        lam: float = 0.5,
        **kwargs: Any,
    ) -> None:
        for name in ("eta", "beta", "_adaptive"):
            if name in kwargs:
                raise TypeError(f"ParallelMRWP got an unexpected keyword argument {name!r}")
        super().__init__(params, base_optimizer, sigma=sigma, lam=lam, _adaptive=False, **kwargs)

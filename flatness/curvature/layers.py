r"""Per-layer curvature: the diagonal blocks of the Hessian, one per parameter tensor or module.

For a parameter block :math:`B` (one tensor, or the tensors of one module)
the block :math:`H_{BB} = P_B^\top H P_B` is the Hessian of the loss in
those parameters with all others held fixed. Its top eigenvalue and trace
say which layers carry the curvature (as in the layer-wise spectra of
Sagun et al. 2017 and Yao et al. 2020, PyHessian). Every block product is
one product of the full operator with a vector that is zero outside the
block, so all blocks share the full operator's cached graphs.

Trace of a block: exact (``numel`` products with the unit vectors) when the
block has at most ``trace_matvecs`` parameters, else Hutch++ with
``trace_matvecs`` products (then ``trace_stderr`` is its standard error).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flatness.curvature.lanczos import lanczos_top_eigs
from flatness.curvature.operator import HessianOperator
from flatness.curvature.trace import hutchpp_trace
from flatness.losses import LossFn


@dataclass(frozen=True)
class LayerCurvature:
    """Top eigenvalue and trace of one diagonal block of the Hessian.

    Attributes:
        name: the parameter name (``by="tensor"``) or module name
            (``by="module"``; ``""`` for the root module's own parameters).
        numel: parameters in the block.
        top_eigenvalue: largest eigenvalue of the block.
        trace: trace of the block.
        trace_stderr: standard error of ``trace`` (0 when exact).
        hvp_count: operator products spent on the block.
    """

    name: str
    numel: int
    top_eigenvalue: float
    trace: float
    trace_stderr: float
    hvp_count: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BlockOperator:
    """:math:`v \\mapsto (H P_B v)_B`: the diagonal block of an operator over coordinates ``[start, stop)``."""

    def __init__(self, H: Any, start: int, stop: int) -> None:
        self.H, self.start, self.stop = H, start, stop
        self.shape: tuple[int, int] = (stop - start, stop - start)
        self.dtype, self.device = H.dtype, H.device
        self.hvp_count = 0

    def __matmul__(self, v: Tensor) -> Tensor:
        if v.ndim == 2:
            return torch.stack([self @ v[:, j] for j in range(v.shape[1])], dim=1)
        full = torch.zeros(self.H.shape[0], dtype=self.dtype, device=self.device)
        full[self.start : self.stop] = v.to(self.dtype)
        self.hvp_count += 1
        return (self.H @ full)[self.start : self.stop]


def parameter_blocks(names: list[str], numels: list[int], by: str = "tensor") -> list[tuple[str, int, int]]:
    """``(name, start, stop)`` coordinate ranges of the blocks, in parameter order.

    Raises:
        ValueError: ``by`` not ``"tensor"`` or ``"module"``.
    """
    if by not in ("tensor", "module"):
        raise ValueError(f"Unknown by {by!r}; expected 'tensor' or 'module'")
    blocks: list[tuple[str, int, int]] = []
    start = 0
    for name, numel in zip(names, numels):
        key = name if by == "tensor" else name.rpartition(".")[0]
        if blocks and by == "module" and blocks[-1][0] == key and blocks[-1][2] == start:
            blocks[-1] = (key, blocks[-1][1], start + numel)
        else:
            blocks.append((key, start, start + numel))
        start += numel
    return blocks


def block_curvature(H: Any, name: str, start: int, stop: int, *, tol: float = 1e-6, trace_matvecs: int = 99, seed: int = 0) -> LayerCurvature:
    """Top eigenvalue (Lanczos) and trace of one diagonal block of ``H``."""
    B = BlockOperator(H, start, stop)
    n = stop - start
    top = float(lanczos_top_eigs(B, 1, tol, 1000, seed=seed).eigenvalues[0])
    if n <= trace_matvecs:
        eye = torch.eye(n, dtype=B.dtype, device=B.device)
        trace, stderr = float(sum(float((B @ eye[i])[i]) for i in range(n))), 0.0
    else:
        est = hutchpp_trace(B, trace_matvecs, seed=seed)
        trace, stderr = est.trace, est.stderr
    return LayerCurvature(name, n, top, trace, stderr, B.hvp_count)


def per_layer_curvature(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    by: str = "tensor",
    tol: float = 1e-6,
    trace_matvecs: int = 99,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    operator: HessianOperator | None = None,
) -> list[LayerCurvature]:
    r"""Top eigenvalue and trace of every diagonal Hessian block (per tensor or per module).

    Args:
        model, loss_fn, batches: as :class:`HessianOperator` (ignored when
            ``operator`` is given).
        by: ``"tensor"`` (one block per parameter tensor) or ``"module"``
            (the parameters of one module together).
        tol: relative eigenvalue tolerance of each block's top eigenvalue.
        trace_matvecs: blocks with at most this many parameters get their
            exact trace, larger ones a Hutch++ estimate with this many products.
        dtype: operator precision (default: the model's).
        seed: seed of start vectors and probes.
        operator: an existing :class:`HessianOperator` to share (its graph cache).

    Returns:
        One :class:`LayerCurvature` per block, in parameter order.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> batches = [(torch.randn(8, 3), torch.tensor([0, 1] * 4))]
        >>> [b.name for b in per_layer_curvature(model, nn.functional.cross_entropy, batches, by="module")]
        ['0', '2']
    """
    H = operator if operator is not None else HessianOperator(model, loss_fn, batches, dtype=dtype)
    blocks = parameter_blocks(H.names, H.numels, by)
    return [block_curvature(H, name, start, stop, tol=tol, trace_matvecs=trace_matvecs, seed=seed) for name, start, stop in blocks]

"""Settings of the Hessian measures: one frozen :class:`HessianSpec`, validated once.

``flatness hessian`` builds it from its flags, ``flatness compare`` and the
Python API build it directly, and the JSON output records its ``asdict``.
Every value is checked in ``__post_init__`` with a one-line
:class:`flatness.errors.FlatnessError` naming the flag; the checks that need
the model (the number of parameters) are in :meth:`HessianSpec.check_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flatness.errors import FlatnessError

DTYPES = {"float32": torch.float32, "float64": torch.float64}
TRACE_METHODS = ("hutch++", "hutchinson")
SPLITS = ("train", "val", "test")  # train: the samples the run trained on; val: its --val-split hold-out
PER_LAYER = ("tensor", "module")
BACKENDS = ("graph", "backward", "jvp", "linearize")  # flatness.curvature.operator.BACKENDS


@dataclass(frozen=True)
class HessianSpec:
    """What to measure on one Hessian operator, and how.

    Attributes:
        top_k: largest eigenvalues wanted (Lanczos).
        tol: relative eigenvalue-error tolerance of the eigenvalues.
        max_iter: most Hessian-vector products for the eigenvalues (the
            check that none was missed included).
        trace: also estimate the trace.
        trace_method: ``"hutch++"`` or ``"hutchinson"``.
        trace_matvecs: products spent on the trace (and per block with
            ``per_layer``: blocks this small get their exact trace).
        density: also estimate the spectral density (SLQ).
        density_steps: Lanczos steps per SLQ run.
        density_runs: SLQ runs (random start vectors).
        density_points: points of the density grid.
        per_layer: ``None``, ``"tensor"`` (one block per parameter tensor)
            or ``"module"`` (one per module): block-diagonal top eigenvalue
            and trace.
        samples: first N samples of the split (``None``: all).
        split: ``"train"`` or ``"test"``.
        batch_size: samples per batch (memory only).
        dtype: ``"float32"`` or ``"float64"`` products.
        backend: HVP backend (:class:`flatness.curvature.HessianOperator`).
        seed: seed of every start vector and probe.
    """

    top_k: int = 5
    tol: float = 1e-6
    max_iter: int = 500
    trace: bool = False
    trace_method: str = "hutch++"
    trace_matvecs: int = 99
    density: bool = False
    density_steps: int = 80
    density_runs: int = 2
    density_points: int = 10_000
    per_layer: str | None = None
    samples: int | None = None
    split: str = "train"
    batch_size: int = 1000
    dtype: str = "float32"
    backend: str = "graph"
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_ints(self)
        if not self.tol > 0 or self.tol != self.tol or self.tol == float("inf"):
            raise FlatnessError(f"--tol: expected a positive number, got {self.tol}")
        if self.max_iter < self.top_k:
            raise FlatnessError(
                f"--max-iter {self.max_iter} cannot give {self.top_k} eigenvalues (Lanczos needs at least --top-k products); "
                f"raise --max-iter (default 500)"
            )
        _choice("--trace-method", self.trace_method, TRACE_METHODS)
        _choice("--split", self.split, SPLITS)
        _choice("--dtype", self.dtype, tuple(DTYPES))
        _choice("--backend", self.backend, BACKENDS)
        if self.per_layer is not None:
            _choice("--per-layer", self.per_layer, PER_LAYER)
        least = 4 if self.trace_method == "hutch++" else 2
        if self.trace and self.trace_matvecs < least:
            raise FlatnessError(f"--trace-matvecs must be at least {least} for {self.trace_method}, got {self.trace_matvecs}")
        if self.density and self.density_points < 2:
            raise FlatnessError(f"the density needs at least 2 grid points, got {self.density_points}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def check_size(self, num_params: int) -> None:
        """Checks that need the operator's size ``n``.

        Raises:
            FlatnessError: ``top_k > n`` (an n-parameter model has n eigenvalues;
                Lanczos finds all of them in n products when ``top_k == n``).
        """
        if self.top_k > num_params:
            raise FlatnessError(
                f"--top-k {self.top_k} is more than the {num_params} parameters of the model (it has {num_params} eigenvalues); "
                f"pass --top-k {num_params} or less, or --density for the whole spectrum of a large model"
            )


def _positive_ints(spec: HessianSpec) -> None:
    for flag, value in (
        ("--top-k", spec.top_k), ("--max-iter", spec.max_iter), ("--trace-matvecs", spec.trace_matvecs),
        ("--density-steps", spec.density_steps), ("--density-runs", spec.density_runs), ("--batch-size", spec.batch_size),
    ):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FlatnessError(f"{flag}: expected a positive integer, got {value!r}")
    if spec.samples is not None and (isinstance(spec.samples, bool) or not isinstance(spec.samples, int) or spec.samples < 1):
        raise FlatnessError(f"--samples: expected a positive integer, got {spec.samples!r}")
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, int):
        raise FlatnessError(f"--seed: expected an integer, got {spec.seed!r}")


def _choice(flag: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise FlatnessError(f"unknown {flag} {value!r}; expected one of {', '.join(map(repr, choices))}")

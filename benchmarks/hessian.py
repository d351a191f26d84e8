"""Top Hessian eigenvalues: our Lanczos vs PyHessian's power iteration vs scipy eigsh, and HVP backends.

One run, one model, one batch: an MLP (40-50-50-10, 5,110 parameters) on
the first 1,000 MNIST-1D training samples, trained briefly with Adam so the
spectrum has the outliers of a trained network. Prints, for k = 1 and k = 5,
the Hessian-vector products, wall time (best of ``--repeat``) and largest
relative eigenvalue error against ``torch.linalg.eigvalsh`` of the dense
float64 Hessian (``--no-dense``: against float64 Lanczos at tol 1e-12), then
the cost of one HVP against one gradient for every backend of
:class:`flatness.curvature.HessianOperator`. PyHessian runs twice: with its
defaults (``tol=1e-3``, the setting papers use) and at ``tol=1e-6``, close
to the accuracy of the others.

    python benchmarks/hessian.py                 # about a minute on a 2-core CPU
    python benchmarks/hessian.py --threads 1     # steadier timings on a busy machine
    python benchmarks/hessian.py --device cuda --model resnet18 --samples 512 --no-dense

Targets (issue 4): error <= 1e-6; for k = 5 at least 3x fewer HVPs and 3x
less wall time than PyHessian; one HVP <= 2x one gradient (default backend).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from flatness.curvature import BACKENDS, HessianOperator, dense_hessian, lanczos_top_eigs
from flatness.data import load_dataset
from flatness.models import build_model

LOSS = nn.functional.cross_entropy


def make_problem(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(args.seed)
    if args.model == "resnet18":
        model = build_model("resnet18", num_classes=10)
        x = torch.randn(args.samples, 3, 32, 32)
        y = torch.randint(0, 10, (args.samples,))
        return model.to(device).eval(), x.to(device), y.to(device)
    ds = load_dataset("mnist1d", augment=False)
    kwargs: dict[str, Any] = {"in_features": 40, "num_classes": 10}
    if args.model == "mlp":
        kwargs.update(hidden=50, depth=2)
    model = build_model(args.model, **kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(args.train_steps):  # a short training run: a realistic spectrum, in seconds
        idx = torch.randint(0, len(ds.train), (128,), generator=g)
        loss = LOSS(model(ds.train.x[idx]), ds.train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = ds.train.x[: args.samples], ds.train.y[: args.samples]
    return model.to(device).eval(), x.to(device), y.to(device)


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Best wall time of ``repeat`` runs, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        _sync()
        t = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t)
    return min(times), out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, tol: float, dtype: torch.dtype) -> tuple[list[float], int]:
    H = HessianOperator(model, LOSS, [(x, y)], dtype=dtype)
    r = lanczos_top_eigs(H, k, tol)
    return r.eigenvalues.tolist(), r.hvp_count


def pyhessian_power(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, tol: float = 1e-3, max_iter: int = 100
) -> tuple[list[float], int]:
    """PyHessian's eigenvalues() (defaults maxIter=100, tol=1e-3), HVPs counted."""
    import pyhessian  # noqa: F401 - registers the submodule

    module = sys.modules["pyhessian.hessian"]
    count = 0
    original = module.hessian_vector_product

    def counted(*a: Any, **kw: Any) -> Any:
        nonlocal count
        count += 1
        return original(*a, **kw)

    module.hessian_vector_product = counted
    try:
        torch.manual_seed(0)
        h = module.hessian(copy.deepcopy(model), LOSS, data=(x, y), cuda=x.is_cuda)
        values, _ = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
    finally:
        module.hessian_vector_product = original
    return sorted(values, reverse=True), count


def scipy_eigsh(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, tol: float) -> tuple[list[float], int]:
    """ARPACK through our operator's to_scipy() bridge (float32, host round trip per product)."""
    from scipy.sparse.linalg import eigsh

    H = HessianOperator(model, LOSS, [(x, y)])
    values = eigsh(H.to_scipy(), k=k, which="LA", tol=tol, return_eigenvectors=False)
    return sorted(values.tolist(), reverse=True), H.hvp_count


def backend_costs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int) -> list[dict[str, Any]]:
    rows = []
    for backend in BACKENDS:
        H = HessianOperator(model, LOSS, [(x, y)], backend=backend)
        v = torch.randn(H.shape[0], device=H.device, generator=torch.Generator(H.device).manual_seed(0))
        setup, _ = best_of(1, lambda: H @ v)  # first product builds whatever the backend caches
        hvp = statistics.median(best_of(1, lambda: H @ v)[0] for _ in range(reps))
        grad = statistics.median(best_of(1, H.loss_and_gradient)[0] for _ in range(reps))
        rows.append({"backend": backend, "first": setup, "hvp": hvp, "grad": grad})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("mlp", "cnn1d", "resnet18"), default="mlp")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--train-steps", type=int, default=1000)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--repeat", type=int, default=3, help="wall time = best of this many runs")
    p.add_argument("--hvp-reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-dense", action="store_true", help="skip the dense reference (large models)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, x, y = make_problem(args, device)
    n = sum(q.numel() for q in model.parameters())
    cpu = platform.processor() or platform.machine()
    print(f"model {args.model}, {n} parameters, {args.samples} samples, device {device} ({cpu}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip

    t = time.perf_counter()
    if not args.no_dense:
        D = dense_hessian(model, LOSS, [(x, y)], method="columns")
        true = torch.linalg.eigvalsh(0.5 * (D + D.T)).flip(0).cpu()
        del D
        what = "eigvalsh of the dense float64 Hessian"
    else:  # too large for a dense matrix: float64 Lanczos at tol 1e-12 (tests check it against eigh)
        true = lanczos_top_eigs(HessianOperator(model, LOSS, [(x, y)], dtype=torch.float64), 5, 1e-12).eigenvalues
        what = "float64 Lanczos at tol 1e-12"
    print(f"reference ({what}): {time.perf_counter() - t:.1f} s; top eigenvalues {[round(v, 4) for v in true[:5].tolist()]}")

    def err(values: list[float], k: int) -> str:
        v = torch.tensor(values, dtype=torch.float64)
        return f"{float(((v - true[:k]).abs() / true[:k].abs()).max()):.1e}"

    methods: list[tuple[str, Callable[[int], tuple[list[float], int]]]] = [
        ("ours: Lanczos, float32", lambda k: ours(model, x, y, k, args.tol, torch.float32)),
        ("ours: Lanczos, float64", lambda k: ours(model, x, y, k, args.tol, torch.float64)),
        ("PyHessian power iteration", lambda k: pyhessian_power(model, x, y, k)),
        ("PyHessian power iteration, tol 1e-6", lambda k: pyhessian_power(model, x, y, k, tol=1e-6, max_iter=1000)),
        ("scipy eigsh (ARPACK)", lambda k: scipy_eigsh(model, x, y, k, args.tol)),
    ]
    print("\n| method | k | HVPs | wall time [s] | max rel. error |\n|---|---:|---:|---:|---:|")
    table: dict[tuple[str, int], tuple[int, float]] = {}
    for k in (1, 5):
        for name, fn in methods:
            seconds, (values, hvps) = best_of(args.repeat, lambda fn=fn, k=k: fn(k))
            table[name, k] = (hvps, seconds)
            print(f"| {name} | {k} | {hvps} | {seconds:.3f} | {err(values, k)} |")
    ours_hvp, ours_s = table["ours: Lanczos, float32", 5]
    ph_hvp, ph_s = table["PyHessian power iteration", 5]
    print(f"\nk=5, ours (float32) vs PyHessian: {ph_hvp / ours_hvp:.1f}x fewer HVPs, {ph_s / ours_s:.1f}x less wall time")

    print("\n| backend | first product [s] | one HVP [ms] | one gradient [ms] | HVP / gradient |\n|---|---:|---:|---:|---:|")
    for row in backend_costs(model, x, y, args.hvp_reps):
        print(f"| {row['backend']} | {row['first']:.3f} | {1e3 * row['hvp']:.2f} | {1e3 * row['grad']:.2f} | {row['hvp'] / row['grad']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

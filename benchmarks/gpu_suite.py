"""GPU suite: the figures the design rests on, measured in one process on one device (issue 16).

Prints one table (and, with ``--json OUT``, writes the same rows as JSON):

1. ``hvp``: one Hessian-vector product of :class:`flatness.curvature.HessianOperator`
   (default ``graph`` backend: Pearlmutter's double backward through the cached
   gradient graph) against one plain gradient (forward + backward), same
   CIFAR ResNet-18, same batch (256 random 3x32x32 images), eval mode; medians.
2. ``eig``: top-5 Hessian eigenvalues of that ResNet-18 on that batch:
   ours (:func:`flatness.curvature.top_eigenvalues`, float32, thick-restart
   Lanczos stopping on the eigenvalue error bound r^2/gap) against
   PyHessian 0.1 (``hessian(...).eigenvalues(top_n=5)``: power iteration with
   deflation; Yao et al. 2020): wall time, Hessian-vector products, largest
   relative error against a float64 reference (our Lanczos on a float64 copy
   of the model, tol 1e-10). TF32 is switched off in this section, so float32
   means float32.
3. ``surface``: a 51x51 loss surface (Li et al. 2018) of the MNIST-1D 1-D CNN
   on 1,000 random MNIST-1D-shaped samples, :func:`flatness.landscape.loss_surface`
   with ``method="vmap"`` against ``method="loop"``, same directions: time of
   each and the largest absolute difference of the losses.
4. ``optim``: step time of ARWP and m-ARWP (Li et al. 2024) over SGD on the
   ResNet-18 (train mode, batch 256), medians of interleaved real updates,
   and host synchronisations per optimizer update counted with
   ``torch.cuda.set_sync_debug_mode("warn")`` (``n/a`` on the CPU), through
   the update helper of ``benchmarks/optim_overhead.py``.

Usage::

    python benchmarks/gpu_suite.py                        # on a GPU box: < 8 minutes
    python benchmarks/gpu_suite.py --json gpu_suite.json
    python benchmarks/gpu_suite.py --smoke --device cpu   # tiny sizes, < 60 s on one core
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hessian import counted_pyhessian  # noqa: E402  (PyHessian with its products counted)
from optim_overhead import METHODS, Runner  # noqa: E402  (its update() counts host syncs per update)

from flatness.curvature import HessianOperator, lanczos_top_eigs, top_eigenvalues  # noqa: E402
from flatness.landscape import SurfaceSpec, loss_surface, model_weights, random_directions  # noqa: E402
from flatness.models import build_model  # noqa: E402

LOSS = nn.functional.cross_entropy
K = 5


@dataclass(frozen=True)
class Sizes:
    """Problem sizes: the issue's (default) or tiny ones (``--smoke``)."""

    batch: int = 256
    width: int = 64  # ResNet-18 width (64 = the standard CIFAR ResNet-18)
    image: int = 32
    grid: int = 51
    surface_samples: int = 1000
    steps: int = 20  # timed optimizer updates per method
    warmup: int = 3
    repeats: int = 10  # timed gradients / HVPs
    ref_max_iter: int = 2000


SMOKE = Sizes(batch=8, width=4, image=16, grid=5, surface_samples=64, steps=2, warmup=1, repeats=2, ref_max_iter=1000)


# -------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds, with the device synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def median_time(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[1] for _ in range(repeats))


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Full float32 in convolutions and matmuls (cuDNN allows TF32 by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def max_rel_error(values: list[float], reference: torch.Tensor) -> float:
    v = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    return float(((v - reference).abs() / reference.abs()).max())


class Table:
    """Rows ``(key, value, note)``; values are floats, ints or None (printed ``n/a``)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float | int | None, str]] = []

    def add(self, key: str, value: float | int | None, note: str = "") -> None:
        self.rows.append((key, value, note))

    def render(self) -> str:
        lines = [f"{'row':<30} {'value':>12}  note", "-" * 78]
        for key, value, note in self.rows:
            if value is None:
                shown = "n/a"
            elif isinstance(value, int):
                shown = str(value)
            else:
                shown = f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
            lines.append(f"{key:<30} {shown:>12}  {note}")
        return "\n".join(lines)


def resnet_problem(sizes: Sizes, device: torch.device, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """CIFAR ResNet-18 (``width`` 64 unless ``--smoke``) and one random CIFAR-shaped batch."""
    torch.manual_seed(seed)
    model = build_model("resnet18", num_classes=10, width=sizes.width).to(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sizes.batch, 3, sizes.image, sizes.image, generator=g).to(device)
    y = torch.randint(0, 10, (sizes.batch,), generator=g).to(device)
    return model, x, y


# ------------------------------------------------------------------ sections
def hvp_vs_gradient(table: Table, sizes: Sizes, device: torch.device) -> None:
    model, x, y = resnet_problem(sizes, device)
    model.eval()

    def gradient() -> None:
        model.zero_grad(set_to_none=True)
        LOSS(model(x), y).backward()

    H = HessianOperator(model, LOSS, [(x, y)])
    v = torch.randn(H.shape[0], device=device, generator=torch.Generator(device=device).manual_seed(0))
    t_grad = median_time(gradient, device, sizes.warmup, sizes.repeats)
    t_hvp = median_time(lambda: H @ v, device, sizes.warmup, sizes.repeats)  # the first product builds the graph cache
    table.add("hvp.gradient_ms", 1e3 * t_grad, "one forward + backward (eval mode), median")
    table.add("hvp.hvp_ms", 1e3 * t_hvp, "one H @ v, graph backend, cache built, median")
    table.add("hvp.ratio", t_hvp / t_grad, "HVP / gradient time")


def pyhessian_top(model: nn.Module, x: torch.Tensor, y: torch.Tensor, tol: float, max_iter: int) -> tuple[list[float], int]:
    """PyHessian 0.1 ``eigenvalues(top_n=5)`` with its Hessian-vector products counted (eigenvalues() only)."""
    with counted_pyhessian() as (module, count):
        torch.manual_seed(0)
        with warnings.catch_warnings():  # its backward(create_graph=True) warns about a reference cycle
            warnings.simplefilter("ignore", UserWarning)
            h = module.hessian(model, LOSS, data=(x, y), cuda=x.is_cuda)
        values, _ = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=K)
    return sorted(values, reverse=True), count[0]


def top_eigs(table: Table, sizes: Sizes, device: torch.device, args: argparse.Namespace) -> None:
    model, x, y = resnet_problem(sizes, device)
    model.eval()
    with no_tf32():
        H64 = HessianOperator(model, LOSS, [(x, y)], dtype=torch.float64)  # one graph cache for both references
        ref, t_ref = timed(lambda: lanczos_top_eigs(H64, K, 1e-10, sizes.ref_max_iter), device)
        reference = ref.eigenvalues
        table.add("eig.ref_lambda1", float(reference[0]), f"float64 Lanczos tol 1e-10: {ref.hvp_count} HVPs, {t_ref:.1f} s, converged={ref.converged}")
        table.add("eig.ref_lambda5", float(reference[-1]), "5th largest eigenvalue of the reference")
        if not args.skip_pyhessian:  # power iteration finds the largest magnitudes: its own reference
            mag, t_mag = timed(lambda: lanczos_top_eigs(H64, K, 1e-10, sizes.ref_max_iter, which="magnitude"), device)
            reference_mag = mag.eigenvalues.sort(descending=True).values
            table.add("eig.ref_mag5", float(reference_mag[-1]), f"reference top 5 by magnitude, the least of them: {mag.hvp_count} HVPs, {t_mag:.1f} s, converged={mag.converged}")
        del H64
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch.manual_seed(0)
        ours, t_ours = timed(lambda: top_eigenvalues(model, LOSS, [(x, y)], k=K, tol=args.tol), device)
        table.add("eig.ours_s", t_ours, f"top_eigenvalues, float32, tol {args.tol:g}, operator build included")
        table.add("eig.ours_hvps", int(ours.hvp_count), "Hessian-vector products")
        table.add("eig.ours_max_rel_err", max_rel_error(ours.eigenvalues.tolist(), reference), "vs the float64 reference (largest 5)")
        if args.skip_pyhessian:
            return
        (values, count), t_ph = timed(lambda: pyhessian_top(copy.deepcopy(model), x, y, args.pyhessian_tol, args.pyhessian_max_iter), device)
    table.add("eig.pyhessian_s", t_ph, f"eigenvalues(top_n=5, tol={args.pyhessian_tol:g}, maxIter={args.pyhessian_max_iter}), float32")
    table.add("eig.pyhessian_hvps", count, "Hessian-vector products")
    table.add("eig.pyhessian_max_rel_err", max_rel_error(values, reference_mag), "vs the float64 reference (top 5 by magnitude)")
    table.add("eig.pyhessian_over_ours_time", t_ph / t_ours, "target >= 3 (issue 16)")
    table.add("eig.pyhessian_over_ours_hvps", count / ours.hvp_count, "target >= 3 (issue 16)")


def surface(table: Table, sizes: Sizes, device: torch.device) -> None:
    torch.manual_seed(0)
    net = build_model("cnn1d", in_features=40, num_classes=10).to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sizes.surface_samples, 40, generator=g).to(device)
    y = torch.randint(0, 10, (sizes.surface_samples,), generator=g).to(device)
    batches = [(x, y)]
    dirs = random_directions(model_weights(net), 2, seed=0)
    out, seconds = {}, {}
    for method in ("vmap", "loop"):
        warm = SurfaceSpec(x="-1:1:3", y="-1:1:3", directions="custom", method=method)
        loss_surface(net, batches, warm, directions=dirs)  # warm-up: kernels, allocator
        spec = SurfaceSpec(x=f"-1:1:{sizes.grid}", y=f"-1:1:{sizes.grid}", directions="custom", method=method)
        out[method], seconds[method] = timed(lambda spec=spec: loss_surface(net, batches, spec, directions=dirs), device)
    diff = float(abs(out["vmap"]["train_loss"] - out["loop"]["train_loss"]).max())
    n = f"{sizes.grid}x{sizes.grid}"
    table.add("surface.vmap_s", seconds["vmap"], f"{n} grid, cnn1d, {sizes.surface_samples} samples")
    table.add("surface.loop_s", seconds["loop"], "same grid and directions, one point at a time")
    table.add("surface.loop_over_vmap", seconds["loop"] / seconds["vmap"], "speed-up of vmap")
    table.add("surface.max_abs_diff", diff, "max |loss_vmap - loss_loop|")
    floors = surface_floors(net, x, y, dirs, sizes.grid, device)
    table.add("surface.floor_vmap_s", floors["vmap"], "bare vmap forward + loss, same points cut in the surface's chunks")
    table.add("surface.floor_loop_s", floors["loop"], "bare forward + loss, one batch per point")
    table.add("surface.vmap_over_floor", seconds["vmap"] / floors["vmap"], "ours (vmap) / its floor (issue 25)")
    table.add("surface.vmap_over_loop_floor", seconds["vmap"] / floors["loop"], "ours (vmap) / the one-batch loop floor")


def surface_floors(net: nn.Module, x: torch.Tensor, y: torch.Tensor, dirs: list, grid: int, device: torch.device) -> dict[str, float]:
    """Time of the bare forward + loss over the same samples and grid points: vmapped in the surface's chunks, and a loop.

    The weight sets are stacked before the clock starts, so only the forward and the loss are timed.
    """
    from torch.func import functional_call, vmap

    from flatness.landscape.evaluate import auto_chunk_size, stacked_weights

    names = [k for k, _ in net.named_parameters()]
    center = model_weights(net)
    axis = torch.linspace(-1, 1, grid, dtype=torch.float64)
    coords = torch.cartesian_prod(axis, axis).to(device)
    chunk = auto_chunk_size(net, [(x, y)], "vmap")
    stacks = [stacked_weights(center, dirs, coords[i : i + chunk]) for i in range(0, len(coords), chunk)]

    def one(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(net, params, (x,)), y)

    def vmapped() -> None:
        with torch.no_grad():
            for ws in stacks:
                vmap(one)(dict(zip(names, ws)))

    def looped() -> None:
        with torch.no_grad():
            for _ in range(len(coords)):
                nn.functional.cross_entropy(net(x), y)

    with torch.no_grad():  # warm-up: kernels, allocator
        vmap(one)(dict(zip(names, stacks[0])))
        nn.functional.cross_entropy(net(x), y)
    return {"vmap": timed(vmapped, device)[1], "loop": timed(looped, device)[1]}


def optim_steps(table: Table, sizes: Sizes, device: torch.device) -> None:
    base, x, y = resnet_problem(sizes, device)
    base.train()
    chosen = {"sgd": "sgd", "arwp": "arwp", "m-arwp": "marwp"}
    runners = {chosen[label]: Runner(label, cls, kw, base, x, y, device) for label, cls, kw, _ in METHODS if label in chosen}
    for _ in range(sizes.warmup):
        for r in runners.values():
            r.update(r.real_closure)
    times: dict[str, list[float]] = {k: [] for k in runners}
    syncs: dict[str, list[int]] = {k: [] for k in runners}
    order = list(runners)
    for step in range(sizes.steps):
        for key in order if step % 2 == 0 else order[::-1]:  # interleaved: drift hits all alike
            elapsed, _, n_sync = runners[key].update(runners[key].real_closure)
            times[key].append(elapsed)
            syncs[key].append(n_sync)
    med = {k: statistics.median(v) for k, v in times.items()}
    cuda = device.type == "cuda"
    table.add("optim.sgd_ms", 1e3 * med["sgd"], f"SGD update (1 forward-backward), median of {sizes.steps}")
    table.add("optim.arwp_ms", 1e3 * med["arwp"], "ARWP update (1 forward-backward)")
    table.add("optim.marwp_ms", 1e3 * med["marwp"], "m-ARWP update (2 forward-backward)")
    table.add("optim.arwp_over_sgd", med["arwp"] / med["sgd"], "step-time ratio")
    table.add("optim.marwp_over_sgd", med["marwp"] / med["sgd"], "step-time ratio (2 passes: >= 2 expected)")
    for key in runners:
        value = statistics.mean(syncs[key]) if cuda else None
        table.add(f"optim.{key}_syncs", value, "host syncs per update (set_sync_debug_mode)" if cuda else "CUDA only")


# ---------------------------------------------------------------------- main
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if available")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (batch 8, width-4 ResNet-18, 5x5 grid, 2 steps)")
    p.add_argument("--skip-pyhessian", action="store_true", help="leave out PyHessian")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the rows as JSON")
    p.add_argument("--tol", type=float, default=1e-5, help="our Lanczos tolerance (float32; default 1e-5)")
    p.add_argument("--pyhessian-tol", type=float, default=1e-5, help="PyHessian's tol (default 1e-5)")
    p.add_argument("--pyhessian-max-iter", type=int, default=100, help="PyHessian's maxIter per eigenvalue (its default 100)")
    p.add_argument("--sections", nargs="+", default=["hvp", "eig", "surface", "optim"], choices=["hvp", "eig", "surface", "optim"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no GPU is available")
    sizes = SMOKE if args.smoke else Sizes()
    table = Table()
    start = time.perf_counter()
    sections = {
        "hvp": lambda: hvp_vs_gradient(table, sizes, device),
        "eig": lambda: top_eigs(table, sizes, device, args),
        "surface": lambda: surface(table, sizes, device),
        "optim": lambda: optim_steps(table, sizes, device),
    }
    seconds = {}
    for name in args.sections:
        _, seconds[name] = timed(sections[name], device)
        print(f"[{name} done in {seconds[name]:.1f} s]", file=sys.stderr, flush=True)
    total = time.perf_counter() - start
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    head = (f"device: {device_name(device)}\ntorch {torch.__version__}, "
            f"{'smoke sizes' if args.smoke else 'full sizes'}: batch {sizes.batch}, ResNet-18 width {sizes.width}, "
            f"{sizes.image}x{sizes.image} images, {sizes.grid}x{sizes.grid} grid; load average {load:.1f}")
    print(head)
    print(table.render())
    print("section seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) + f"; total {total:.1f} s")
    if args.json:
        rows = {k: (None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v) for k, v, _ in table.rows}
        Path(args.json).write_text(json.dumps({
            "device": device_name(device), "torch": torch.__version__, "smoke": args.smoke,
            "sizes": sizes.__dict__, "rows": rows, "notes": {k: n for k, _, n in table.rows},
            "section_seconds": seconds, "total_seconds": total,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

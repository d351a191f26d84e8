"""Benchmark: how the cost of each analysis grows with the model and the samples (issue 25).

Operations, each timed in its own subprocess (so its peak memory is its own):

- ``step``: one SGD update on all samples (forward + backward in chunks of
  ``--chunk``, then ``opt.step()``): the unit of training cost;
- ``hvp``: one Hessian-vector product of the default operator
  (:class:`flatness.curvature.HessianOperator`, batches of ``--chunk``
  samples, ``graph`` backend: gradient graphs cached up to half the free
  memory, so the first product builds them);
- ``hvp_backward``: the same product with ``backend="backward"`` (every
  batch's graph rebuilt and freed in turn: memory of one chunk; samples
  sweep only);
- ``top5``: Lanczos top-5 eigenvalues, relative tol ``--tol``;
- ``trace``: Hutch++ trace with ``--trace-matvecs`` products;
- ``surface``: a ``--grid`` x ``--grid`` loss surface (random filter-normalised directions).

Each row gives thread CPU time (one thread: the time of the work, unaffected
by other processes), wall time, products, and the peak resident memory the
operation added (``ru_maxrss`` after it minus before it, in the same
process; on CUDA ``torch.cuda.max_memory_allocated``). Two sweeps:

- model size at ``--size-samples`` CIFAR-shaped samples (3x32x32): the CIFAR
  ResNet-18 of ``flatness.models`` at widths 2, 6, 20 and 64 (about 1e4,
  1e5, 1e6 and 1.1e7 parameters; width 64 is ResNet-18 itself). On a CPU,
  ResNet-18 itself runs ``step`` and ``hvp`` only unless ``--full`` (a top-5
  takes tens of products of ~20 s each on one core; ``benchmarks/eigen_compare.py``
  runs one);
- samples (256, 1,024, 4,096) for the MNIST-1D CNN on MNIST-1D-shaped inputs.

The table is printed; the figure (``--figure``, default figures/scaling.png)
plots thread time against parameters and against samples, log-log, with
the fitted exponent of each operation in the legend.

    python benchmarks/scaling.py                 # about 15 minutes on a loaded 2-core machine
    python benchmarks/scaling.py --quick         # seconds (the smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

LOSS = nn.functional.cross_entropy
OPS = ("step", "hvp", "hvp_backward", "top5", "trace", "surface")
COLUMNS = ("sweep", "model", "params", "samples", "op", "thread_s", "wall_s", "products", "peak_mem_mb")


def problem(model: str, width: int, samples: int, device: torch.device) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A seeded model and its samples, as batches of at most ``chunk`` (set by the caller)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if model == "resnet18":
        from flatness.models.resnet import resnet18

        net = resnet18(width=width)
        x = torch.randn(samples, 3, 32, 32, generator=g)
    elif model == "cnn1d":
        from flatness.models import build_model

        net = build_model("cnn1d", in_features=40, num_classes=10)
        x = torch.randn(samples, 40, generator=g)
    else:
        raise ValueError(f"Unknown model {model!r}; expected 'resnet18' or 'cnn1d'")
    y = torch.randint(0, 10, (samples,), generator=g)
    return net.to(device), [(x.to(device), y.to(device))]


def run_op(op: str, net: nn.Module, data: list, args: argparse.Namespace) -> int:
    """Run ``op`` once; returns the Hessian-vector products it used."""
    from flatness.curvature import HessianOperator, lanczos_top_eigs
    from flatness.curvature.trace import hutchpp_trace

    x, y = data[0]
    batches = list(zip(x.split(args.chunk), y.split(args.chunk)))
    if op == "step":
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        net.train()
        opt.zero_grad()
        for bx, by in batches:
            (LOSS(net(bx), by) * (len(by) / len(y))).backward()
        opt.step()
        return 0
    if op == "surface":
        from flatness.landscape import SurfaceSpec, loss_surface

        loss_surface(net, batches, SurfaceSpec(x=f"-1:1:{args.grid}", y=f"-1:1:{args.grid}"))
        return 0
    H = HessianOperator(net, LOSS, batches, backend="backward" if op == "hvp_backward" else "graph")
    if op in ("hvp", "hvp_backward"):
        H @ torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0)).to(H.device)
    elif op == "top5":
        lanczos_top_eigs(H, 5, args.tol, args.max_products)
    elif op == "trace":
        hutchpp_trace(H, args.trace_matvecs)
    else:
        raise ValueError(f"Unknown op {op!r}; expected one of {', '.join(OPS)}")
    return H.hvp_count


def case(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One (model, samples, op) in this process: times, products, peak memory added."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    net, data = problem(spec["model"], spec["width"], spec["samples"], device)
    # warm-up on 8 samples: first-call costs (kernel selection, autograd set-up) are not the operation's
    tiny = argparse.Namespace(**{**vars(args), "chunk": 8, "grid": 2, "trace_matvecs": 4, "max_products": 6, "tol": 1e-1})
    run_op(spec["op"], net, [(data[0][0][:8], data[0][1][:8])], tiny)
    net, data = problem(spec["model"], spec["width"], spec["samples"], device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    t_thread, t_wall = time.thread_time(), time.perf_counter()
    products = run_op(spec["op"], net, data, args)
    if cuda:
        torch.cuda.synchronize()
    thread_s, wall_s = time.thread_time() - t_thread, time.perf_counter() - t_wall
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {**spec, "params": sum(p.numel() for p in net.parameters()), "thread_s": thread_s, "wall_s": wall_s,
            "products": products, "peak_mem_mb": max(peak - base, 0) / 2**20}


def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.quick:
        return [{"sweep": s, "model": "cnn1d", "width": 0, "samples": n, "op": op} for s, n in (("samples", 64), ("samples", 128)) for op in OPS]
    out = []
    for w in args.widths:
        ops = tuple(o for o in OPS if o != "hvp_backward") if (w < 64 or args.full) else ("step", "hvp")
        out += [{"sweep": "params", "model": "resnet18", "width": w, "samples": args.size_samples, "op": op} for op in ops]
    out += [{"sweep": "samples", "model": "cnn1d", "width": 0, "samples": n, "op": op} for n in args.samples for op in OPS]
    return out


def fit(xs: list[float], ys: list[float]) -> float:
    """Slope of log y against log x (least squares): the exponent of a power law."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0]) if len(set(xs)) > 1 else float("nan")


def exponents(rows: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    out = {}
    for sweep, key in (("params", "params"), ("samples", "samples")):
        for op in OPS:
            pts = [(r[key], r["thread_s"]) for r in rows if r["sweep"] == sweep and r["op"] == op and r["thread_s"] > 0]
            if len(pts) > 1:
                out[(sweep, op)] = fit([p[0] for p in pts], [p[1] for p in pts])
    return out


def figure(rows: list[dict[str, Any]], slopes: dict[tuple[str, str], float], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, (sweep, key, title) in zip(axes[:2], (("params", "params", "thread time vs parameters (ResNet-18 widths, CIFAR-sized)"),
                                                  ("samples", "samples", "thread time vs samples (MNIST-1D CNN)"))):
        for op in OPS:
            pts = sorted((r[key], r["thread_s"]) for r in rows if r["sweep"] == sweep and r["op"] == op)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{op} (slope {slopes.get((sweep, op), float('nan')):.2f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("thread CPU time [s]")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=7)
    ax = axes[2]
    for op in ("hvp", "hvp_backward", "step"):
        pts = sorted((r["samples"], r["peak_mem_mb"]) for r in rows if r["sweep"] == "samples" and r["op"] == op)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=op)
    ax.set_xscale("log")
    ax.set_xlabel("samples")
    ax.set_ylabel("peak memory added [MiB]")
    ax.set_title("peak memory vs samples (MNIST-1D CNN, chunks of 256)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[2, 6, 20, 64], help="ResNet-18 widths (64: ResNet-18)")
    p.add_argument("--size-samples", type=int, default=256, help="samples of the model-size sweep")
    p.add_argument("--samples", type=int, nargs="+", default=[256, 1024, 4096], help="samples of the samples sweep")
    p.add_argument("--chunk", type=int, default=256, help="samples per batch of every operation")
    p.add_argument("--tol", type=float, default=1e-3, help="top-5 relative tolerance")
    p.add_argument("--max-products", type=int, default=40, help="most products of a top-5 run (the row says how many it used)")
    p.add_argument("--trace-matvecs", type=int, default=9)
    p.add_argument("--grid", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--full", action="store_true", help="also top-5, trace and surface on ResNet-18 itself (slow on a CPU)")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds): the MNIST-1D CNN at 64 and 128 samples")
    p.add_argument("--figure", default="figures/scaling.png")
    p.add_argument("--json", default=None)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one case in this process
    args = p.parse_args(argv)
    if args.quick:
        args.chunk, args.grid, args.trace_matvecs, args.max_products = 32, 3, 6, 20
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.case is not None:
        print(json.dumps(case(json.loads(args.case), args)))
        return 0
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"{args.threads} thread(s), torch {torch.__version__}, device {args.device}, thread CPU time; chunks of {args.chunk}, "
          f"top-5 tol {args.tol:g}, trace {args.trace_matvecs} products, {args.grid}x{args.grid} surface"
          + ("" if args.full or args.quick else "; ResNet-18 itself (width 64): step and hvp only (--full for the rest)"))
    start = time.perf_counter()
    rows = []
    forward = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--json", args.json, "--figure", args.figure)]
    for spec in cases(args):
        if args.quick:  # in this process (seconds; the memory column is then only indicative)
            rows.append(case(spec, args))
            continue
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run([sys.executable, __file__, *forward, "--case", json.dumps(spec)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"case {spec} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---" for _ in COLUMNS) + "|")
    for r in rows:
        name = f"{r['model']}-w{r['width']}" if r["model"] == "resnet18" else r["model"]
        print(f"| {r['sweep']} | {name} | {r['params']} | {r['samples']} | {r['op']} | {r['thread_s']:.3g} | {r['wall_s']:.3g} | "
              f"{r['products']} | {r['peak_mem_mb']:.1f} |")
    slopes = exponents(rows)
    print("\nfitted exponents (thread time ~ x^slope): " + ", ".join(f"{op} vs {sweep}: {s:.2f}" for (sweep, op), s in slopes.items()))
    figure(rows, slopes, Path(args.figure))
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"figure {args.figure}; load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; total {time.perf_counter() - start:.0f} s wall")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "exponents": {f"{op} vs {sw}": s for (sw, op), s in slopes.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

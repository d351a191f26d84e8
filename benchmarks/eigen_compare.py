"""Benchmark: top-5 Hessian eigenvalues, ours vs PyHessian vs hessian-eigenthings, side by side (issue 25).

One model, one batch of CIFAR-sized samples (3x32x32, seeded), the model in
eval mode (BatchNorm on running statistics, as every library here measures
it). Every method runs in its own subprocess, in float32 as users run it:

- ``ours``: :func:`flatness.curvature.lanczos_top_eigs` (thick-restart
  Lanczos, stops on the eigenvalue error bound), relative tol ``--tol``;
- ``PyHessian``: ``hessian.eigenvalues(top_n=5)`` (power iteration with
  deflation) at its defaults (``maxIter=100``, ``tol=1e-3``);
- ``eigenthings lanczos``: hessian-eigenthings 1.0 ``lanczos(op, k=5,
  which="LA", max_iter=--eigenthings-steps)`` (fixed number of steps, full
  reorthogonalisation);
- ``eigenthings power``: ``deflated_power_iteration(op, k=5, max_iter=100, tol=1e-4)``.

Products are counted at each library's own Hessian-vector product; time is
thread CPU time (one thread); memory is the peak resident memory the method
added to its process (``ru_maxrss`` after minus before). The error is the
largest relative error of the five values against a float64 reference
(our Lanczos at tol 1e-10 on a float64 copy), taken against the five
largest *magnitudes* for the power iterations (what they find). The float64
reference is only affordable on small models; ``--no-reference`` skips it.

The default model is the CIFAR ResNet-18 of ``flatness.models`` at width 4
(43 k parameters) on 128 samples: on this project's loaded 2-core CPU,
ResNet-18 itself (width 64, 11 M parameters, 256 samples) costs ~20 s per
product, so one top-5 takes ten minutes or more per method; run it with
``--width 64 --samples 256 --no-reference`` on a GPU or a free machine.

    python benchmarks/eigen_compare.py
    python benchmarks/eigen_compare.py --quick          # seconds: the smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

LOSS = nn.functional.cross_entropy
K = 5
METHODS = ("ours", "pyhessian", "eigenthings_lanczos", "eigenthings_power")
MAGNITUDE = ("pyhessian", "eigenthings_power")


def problem(args: argparse.Namespace, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from flatness.models.resnet import resnet18

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = resnet18(width=args.width).eval()
    x = torch.randn(args.samples, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.samples,), generator=g)
    # a few SGD steps so the spectrum has the separated top of a trained net (as in benchmarks/hessian.py)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(args.train_steps):
        opt.zero_grad()
        LOSS(net(x), y).backward()
        opt.step()
    net.eval()
    return net.to(dtype), x.to(dtype), y


def run(method: str, net: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> tuple[list[float], int]:
    """The top-5 values and the products one method used."""
    if method in ("ours", "reference", "reference_magnitude"):
        from flatness.curvature import HessianOperator, lanczos_top_eigs

        H = HessianOperator(net, LOSS, [(x, y)])
        tol, which = (args.tol, "largest") if method == "ours" else (1e-10, "largest" if method == "reference" else "magnitude")
        r = lanczos_top_eigs(H, K, tol, 3000, which=which)
        return sorted(r.eigenvalues.tolist(), reverse=True), r.hvp_count
    if method == "pyhessian":
        from benchmarks.hessian import counted_pyhessian

        with counted_pyhessian() as (module, count):
            torch.manual_seed(0)
            h = module.hessian(copy.deepcopy(net), LOSS, data=(x, y), cuda=False)
            values, _ = h.eigenvalues(top_n=K, maxIter=args.power_iters)
        return sorted(values, reverse=True), count[0]
    import hessian_eigenthings as he

    op = he.HessianOperator(net, [(x, y)], he.supervised_loss(LOSS))
    count = [0]
    matvec = op.matvec

    def counted(v: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return matvec(v)

    op.matvec = counted  # type: ignore[method-assign]
    if method == "eigenthings_lanczos":
        r = he.lanczos(op, k=K, max_iter=args.eigenthings_steps, which="LA", seed=0)
    elif method == "eigenthings_power":
        r = he.deflated_power_iteration(op, k=K, max_iter=args.power_iters, tol=1e-4, seed=0)
    else:
        raise ValueError(f"Unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return sorted(r.eigenvalues.tolist(), reverse=True), count[0]


def case(method: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    dtype = torch.float64 if method.startswith("reference") else torch.float32
    net, x, y = problem(args, dtype)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.thread_time()
    values, products = run(method, net, x, y, args)
    seconds = time.thread_time() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "values": values, "products": products, "thread_s": seconds, "peak_mem_mb": max(peak - base, 0) / 2**20,
            "params": sum(p.numel() for p in net.parameters())}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=4, help="ResNet-18 width (64: ResNet-18 itself)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--tol", type=float, default=1e-4, help="our relative eigenvalue tolerance")
    p.add_argument("--eigenthings-steps", type=int, default=40, help="hessian-eigenthings Lanczos steps")
    p.add_argument("--power-iters", type=int, default=100, help="most iterations per eigenvalue of the power iterations (their default 100)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-reference", action="store_true", help="skip the float64 reference (large models)")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds)")
    p.add_argument("--json", default=None)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.samples, args.train_steps, args.eigenthings_steps, args.power_iters = 2, 8, 1, 12, 5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.case:
        print(json.dumps(case(args.case, args)))
        return 0
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"{args.threads} thread(s), torch {torch.__version__}, thread CPU time; CIFAR ResNet-18 width {args.width}, "
          f"{args.samples} samples, top-{K}, float32 (reference float64)")
    forward = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--json", args.json)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
    results = {}
    for method in (() if args.no_reference else ("reference", "reference_magnitude")) + METHODS:
        if args.quick:  # in this process (seconds; the memory column is then only indicative)
            results[method] = case(method, args)
            continue
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *forward, "--case", method], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{method} failed:\n{proc.stderr[-2000:]}")
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = results.get("reference")
    ref_mag = results.get("reference_magnitude")
    if ref:
        print(f"{ref['params']} parameters; float64 top-{K}: {[round(v, 5) for v in ref['values']]} ({ref['products']} products); "
              f"by magnitude: {[round(v, 5) for v in ref_mag['values']]}")
    cols = ("method", "products", "thread_s", "peak_mem_mb", "max_rel_err", "products / ours", "time / ours")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    ours = results["ours"]
    for method in METHODS:
        r = results[method]
        truth = (ref_mag if method in MAGNITUDE else ref) if ref else None
        if truth:
            t = torch.tensor(sorted(truth["values"], reverse=True), dtype=torch.float64)
            v = torch.tensor(r["values"], dtype=torch.float64)
            r["max_rel_err"] = float(((v - t).abs() / t.abs()).max())
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "-"
        print(f"| {method} | {r['products']} | {r['thread_s']:.3g} | {r['peak_mem_mb']:.1f} | {err} | "
              f"{r['products'] / max(ours['products'], 1):.2f} | {r['thread_s'] / max(ours['thread_s'], 1e-12):.2f} |")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

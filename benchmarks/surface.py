"""Benchmark: a 51x51 2-D loss surface of the MNIST-1D 1-D CNN on 1,000 samples.

Compares, in one run and on the same directions:

- ``ours``: :func:`flatness.landscape.loss_surface` as ``flatness surface``
  runs it (device-resident batches loaded once, chunks of points, results
  written to an .h5 file chunk by chunk), with the method ``auto`` picks
  (``loop`` on the CPU, ``vmap`` on CUDA);
- ``ours (vmap)``: the same with ``torch.func.vmap`` over chunks of weight
  sets, to show where vectorizing pays (and where it does not);
- ``loss-landscape scheme``: the per-point loop of tomgoldstein/loss-landscape
  (``plot_surface.py`` / ``evaluation.eval_loss``): for each grid point set
  the weights (``p.data = w + d0 * x + d1 * y``), run the whole
  ``DataLoader`` (their default batch size 128, ``shuffle=False``,
  in-process loading by default: the most favourable setting for them;
  ``--ref-workers 2`` is their default ``--threads 2``) with a
  ``loss.item()`` per batch, next point;
- two floors (issue 25): the bare forward + loss over the same samples, once
  per grid point, with nothing else (no weights written, no accuracy, no
  bookkeeping): ``floor (one batch)`` forwards all samples at once,
  ``floor (cut as ours)`` in the micro-batches the surface's loop cuts them
  into (:func:`flatness.landscape.evaluate.micro_batch_size`). No surface
  method can do less work per point than its floor; ``ours / floor`` is how
  far from it we are;

and prints the process CPU time of each (one thread: the thread time of the
work, unaffected by other processes on a shared machine; ``--wall`` for wall
time), the ratios against the reference and the floors, and the largest
difference of the values against the reference. The grid is timed in blocks of rows with the methods
taking turns, so that a change of load on a shared machine affects all of
them alike. Usage::

    python benchmarks/surface.py                  # defaults: 51x51, 1000 samples
    python benchmarks/surface.py --checkpoint runs/sgd/final.pt --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatness.data import analysis_batches, load_dataset
from flatness.landscape import SurfaceFile, SurfaceSpec, loss_surface, model_weights, random_directions
from flatness.landscape.evaluate import _micro_batches, micro_batch_size
from flatness.landscape.grid import grid_points
from flatness.models import build_model


def loss_landscape_scheme(net: nn.Module, loader: DataLoader, center: list, dirs: list, points: np.ndarray) -> np.ndarray:
    """tomgoldstein/loss-landscape's crunch(): set weights, evaluate the whole loader, next point."""
    criterion = nn.CrossEntropyLoss()
    out = np.zeros((len(points), 2))
    net.eval()
    for n, (a, b) in enumerate(points):
        # net_plotter.set_weights
        changes = [d0 * float(a) + d1 * float(b) for d0, d1 in zip(dirs[0], dirs[1])]
        for p, w, d in zip(net.parameters(), center, changes):
            p.data = w + d
        # evaluation.eval_loss
        correct, total_loss, total = 0, 0.0, 0
        with torch.no_grad():
            for inputs, targets in loader:
                bs = inputs.size(0)
                total += bs
                outputs = net(inputs)
                loss = criterion(outputs, targets)
                total_loss += loss.item() * bs
                _, predicted = outputs.max(1)
                correct += predicted.eq(targets).sum()
        out[n] = (total_loss / total, float(100.0 * correct / total))
    for p, w in zip(net.parameters(), center):
        p.data = w.clone()  # (loss-landscape restores p.data = w; a copy keeps `center` apart from the model)
    return out


@torch.no_grad()
def floor(net: nn.Module, batches: list, points: int) -> np.ndarray:
    """The bare forward + mean loss over ``batches`` (summed, weighted), ``points`` times: the work of a surface, nothing else."""
    out = torch.zeros(points, dtype=torch.float64)
    total = sum(len(y) for _, y in batches)
    for k in range(points):
        acc = torch.zeros((), dtype=torch.float64)
        for x, y in batches:
            acc += nn.functional.cross_entropy(net(x), y).double() * len(y)
        out[k] = acc / total
    return out.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a cnn1d checkpoint (default: a fresh seeded cnn1d)")
    parser.add_argument("--n", type=int, default=51, help="grid points per axis")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--ref-batch-size", type=int, default=128, help="loss-landscape's default --batch_size")
    parser.add_argument("--ref-workers", type=int, default=0,
                        help="DataLoader workers of the reference (loss-landscape's default --threads is 2; 0 favours it)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--blocks", type=int, default=8, help="the grid is timed in this many interleaved blocks of rows")
    parser.add_argument("--no-vmap", action="store_true", help="skip the vmap row")
    parser.add_argument("--wall", action="store_true", help="time wall clock instead of process CPU time")
    args = parser.parse_args()
    clock = time.perf_counter if args.wall else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.checkpoint:
        from flatness.checkpoint import load_checkpoint

        net = load_checkpoint(args.checkpoint).model
    else:
        torch.manual_seed(0)
        net = build_model("cnn1d", in_features=40, num_classes=10)
    net.eval()
    ds = load_dataset("mnist1d", augment=False)
    batches = analysis_batches(ds.train, samples=args.samples, batch_size=1000)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    center = model_weights(net)
    dirs = random_directions(center, 2, seed=0)
    xs = np.linspace(-1, 1, args.n)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.ref_batch_size, shuffle=False, num_workers=args.ref_workers)
    auto = "vmap" if next(net.parameters()).is_cuda else "loop"
    names = [f"ours (loss_surface, auto = {auto}, .h5 written)"]
    if not args.no_vmap:
        names.append("ours (loss_surface, vmap, 16 points per chunk)")
    ref_name = f"loss-landscape scheme (DataLoader, bs {args.ref_batch_size}" + (f", {args.ref_workers} workers)" if args.ref_workers else ")")
    cut = _micro_batches([(x, y)], micro_batch_size(net, [(x, y)]))
    floor_names = ["floor: bare forward + loss, one batch", f"floor: bare forward + loss, cut as ours ({'+'.join(str(len(b[1])) for b in cut)})"]
    seconds = dict.fromkeys([ref_name, *names, *floor_names], 0.0)
    values: dict[str, list[np.ndarray]] = {k: [] for k in seconds}

    # The grid's rows are timed block by block, the methods taking turns within each block,
    # so a change of load on a shared machine hits every method alike.
    edges = np.linspace(0, args.n, args.blocks + 1).round().astype(int)
    with tempfile.TemporaryDirectory() as tmp:
        for b, (i0, i1) in enumerate(zip(edges[:-1], edges[1:])):
            if i1 - i0 < 2:
                raise SystemExit("each block needs at least two rows: use fewer --blocks")
            x_axis = (float(xs[i0]), float(xs[i1 - 1]), int(i1 - i0))
            runs = {
                names[0]: lambda: loss_surface(net, batches, SurfaceSpec(x=x_axis, y=f"-1:1:{args.n}", directions="custom"), directions=dirs,
                                               output=SurfaceFile(Path(tmp) / f"b{b}.h5")),
            }
            if not args.no_vmap:
                runs[names[1]] = lambda: loss_surface(net, batches, SurfaceSpec(x=x_axis, y=f"-1:1:{args.n}", directions="custom", method="vmap",
                                                                               chunk_size=16), directions=dirs)
            points = grid_points(np.linspace(*x_axis[:2], x_axis[2]), xs)
            runs[ref_name] = lambda: loss_landscape_scheme(net, loader, center, dirs, points)
            runs[floor_names[0]] = lambda: floor(net, [(x, y)], len(points))
            runs[floor_names[1]] = lambda: floor(net, cut, len(points))
            order = list(runs)
            order = order[b % len(order) :] + order[: b % len(order)]
            for name in order:
                t = clock()
                out = runs[name]()
                seconds[name] += clock() - t
                if name in floor_names:
                    continue
                if name == ref_name:
                    values[name].append(out)
                else:
                    values[name].append(np.stack([out["train_loss"].reshape(-1), out["train_acc"].reshape(-1)], 1))

    ref = np.concatenate(values[ref_name])
    n_pts = len(ref)
    t_ref = seconds[ref_name]
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"{args.n}x{args.n} surface, cnn1d on MNIST-1D, {len(y)} samples, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}, device {next(net.parameters()).device}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"{'wall' if args.wall else 'process CPU'} time")
    header = (f"| {'method':<54} | {'seconds':>8} | {'ms/point':>8} | {'speedup':>7} | {'/ floor 1 batch':>15} | "
              f"{'/ floor cut':>11} | {'max dloss':>9} | {'max dacc':>8} |")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    f1, fc = seconds[floor_names[0]], seconds[floor_names[1]]
    for name in [ref_name, *names, *floor_names]:
        secs = seconds[name]
        if values.get(name) and name != ref_name:
            got = np.concatenate(values[name])
            dl, da = f"{np.abs(got[:, 0] - ref[:, 0]).max():9.1e}", f"{np.abs(got[:, 1] - ref[:, 1]).max():8.1e}"
        else:
            dl, da = f"{'-':>9}", f"{'-':>8}"
        print(f"| {name:<54} | {secs:8.2f} | {1e3 * secs / n_pts:8.3f} | {t_ref / secs:7.2f} | {secs / f1:15.2f} | {secs / fc:11.2f} | {dl} | {da} |")


if __name__ == "__main__":
    main()

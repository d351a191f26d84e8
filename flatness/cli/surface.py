"""``flatness surface``: a 1-D or 2-D loss surface around a checkpoint, into a resumable .h5 file."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from flatness.cli.common import add_command, add_common, positive_int

EXAMPLES = """\
  flatness surface runs/sgd/final.pt --dim 1 --x -1:1:51 --out sgd_1d.h5
  flatness surface runs/sgd/final.pt --dim 2 --x -1:1:51 --y -1:1:51 --samples 1000 --out sgd_2d.h5
  flatness surface runs/sgd/final.pt --dim 2 --x -1:1:51 --y -1:1:51 --out sgd_2d.h5 --resume   # after a kill
  flatness surface runs/sgd/final.pt --dim 2 --directions pca --run runs/sgd --x -40:40:41 --y -20:20:41 --out pca.h5
  flatness surface runs/sgd/final.pt --dim 1 --directions interp --to runs/sam/final.pt --x -0.5:1.5:41 --out line.h5
  flatness surface a.pt --dim 2 --directions interp --to b.pt c.pt --x -0.5:1.5:31 --y -0.5:1.5:31 --out plane.h5
  torchrun --nproc_per_node 2 -m flatness surface runs/sgd/final.pt --dim 2 --x -1:1:51 --y -1:1:51 --out s.h5
  flatness plot sgd_2d.h5 --kind contour --out sgd_contour.png

Grid axes are MIN:MAX:N (N points from MIN to MAX, inclusive). The file holds
xcoordinates, ycoordinates, train_loss, train_acc (%) [, test_loss, test_acc]
as (nx, ny) arrays in "ij" order, plus the directions; missing cells are NaN.
"""

# Appended to a help text that states its own default: ArgumentDefaultsHelpFormatter then adds none.
_OWN = "%(default).0s"

# Accept "-1:1:51" as the value of --x / --y (argparse otherwise takes it for an option).
_NEGATIVE_VALUE = re.compile(r"^-\d+$|^-\d*\.\d+$|^-[\d.eE+-]*:[-\d.eE+:]*$")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "surface", "Compute a 1-D or 2-D loss surface around a checkpoint (Li et al. 2018).", EXAMPLES)
    p._negative_number_matcher = _NEGATIVE_VALUE  # type: ignore[attr-defined]
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint (.pt) at the centre, or a run directory (its final.pt)")
    g = p.add_argument_group("grid and directions")
    g.add_argument("--dim", type=int, choices=(1, 2), default=None, help="1 or 2 (default: 2 when --y is given)" + _OWN)
    g.add_argument("--x", required=True, metavar="MIN:MAX:N", help="first axis, e.g. -1:1:51" + _OWN)
    g.add_argument("--y", default=None, metavar="MIN:MAX:N", help="second axis (2-D)" + _OWN)
    g.add_argument(
        "--directions",
        choices=("filter", "layer", "model", "pca", "interp"),
        default=None,
        help="random normalized per filter/layer/model, PCA of --run's checkpoints, or towards --to (default: interp with --to, else filter)" + _OWN,
    )
    g.add_argument("--ignore", choices=("biasbn", "none"), default=None, help="zero bias and BN directions (default: biasbn for random, none for pca/interp)" + _OWN)
    g.add_argument("--to", nargs="+", default=[], metavar="CKPT", help="interp: the checkpoint at x=1 (and the one at y=1)" + _OWN)
    g.add_argument("--run", default=None, metavar="RUN_DIR", help="run directory: trajectory for pca, projected onto 2-D surfaces" + _OWN)
    d = p.add_argument_group("data")
    d.add_argument("--samples", type=positive_int, default=None, help="first N samples of the split (default: all)" + _OWN)
    d.add_argument("--split", choices=("train", "test"), default="train", help="which split the surface is computed on")
    d.add_argument("--test", action="store_true", help="also compute test_loss / test_acc on the test split" + _OWN)
    d.add_argument("--batch-size", type=positive_int, default=1000, help="samples per forward pass")
    d.add_argument("--model", default=None, help="model name, for plain state_dict checkpoints" + _OWN)
    d.add_argument("--data", default=None, help="dataset (default: the checkpoint's)" + _OWN)
    d.add_argument("--data-dir", default=None, help="folder with the CIFAR python-pickle batches" + _OWN)
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="FILE.h5", help="output file (default: CKPT_surface_<dim>d.h5 beside the checkpoint)" + _OWN)
    o.add_argument("--resume", action="store_true", help="continue FILE.h5: compute only its missing cells (same settings required)" + _OWN)
    o.add_argument("--chunk-size", type=positive_int, default=None, help="grid points evaluated and written together (default: auto)" + _OWN)
    o.add_argument("--method", choices=("auto", "vmap", "loop"), default="auto", help="vmap over weight sets (auto: on CUDA) or a loop over points")
    add_common(o)
    p.set_defaults(func=run)


def _default_out(checkpoint: str, dim: int) -> Path:
    path = Path(checkpoint)
    if path.is_dir():
        return path / f"surface_{dim}d.h5"
    return path.with_name(f"{path.stem}_surface_{dim}d.h5")


def _test_hook() -> Callable[[int, int], None] | None:
    """Hidden test hook (``FLATNESS_SURFACE_CHUNK_DELAY=SECONDS``): after each written chunk,
    report ``points DONE/TOTAL`` on stderr and sleep, so a test can kill the run in the middle."""
    try:
        delay = float(os.environ.get("FLATNESS_SURFACE_CHUNK_DELAY", "0"))
    except ValueError:
        return None
    if delay <= 0:
        return None

    def hook(done: int, total: int) -> None:
        sys.stderr.write(f"points {done}/{total}\n")
        sys.stderr.flush()
        time.sleep(delay)

    return hook


def run(args: argparse.Namespace) -> int:
    from flatness.landscape import surface_from_checkpoint

    dim = args.dim if args.dim is not None else (2 if args.y is not None else 1)
    out = Path(args.out) if args.out else _default_out(args.checkpoint, dim)
    callback = _test_hook()
    start = time.perf_counter()
    surface = surface_from_checkpoint(
        args.checkpoint,
        out=out,
        x=args.x,
        y=args.y,
        dim=dim,
        directions=args.directions,
        ignore=args.ignore,
        to=args.to,
        run=args.run,
        samples=args.samples,
        split=args.split,
        test=args.test,
        batch_size=args.batch_size,
        model=args.model,
        data=args.data,
        data_dir=args.data_dir,
        device=args.device,
        seed=args.seed,
        chunk_size=args.chunk_size,
        method=args.method,
        resume=args.resume,
        force=args.force,
        quiet=args.quiet,
        callback=callback,
    )
    # The library leaves the torchrun process group it joined, so ask torchrun's RANK who reports.
    if int(os.environ.get("RANK", "0")) == 0:
        key = surface.default_key()
        grid = " x ".join(str(n) for n in surface.shape)
        values = surface[key]
        centre = _centre_value(surface, key)
        print(
            f"wrote {out}: {grid} {key}, min {float(values.min()):.4g}, max {float(values.max()):.4g}, "
            f"centre {centre:.4g} ({time.perf_counter() - start:.1f}s)"
        )
    return 0


def _centre_value(surface, key: str) -> float:  # noqa: ANN001 - Surface, imported lazily
    import numpy as np

    i = int(np.abs(surface.xcoordinates).argmin())
    if surface.ycoordinates is None:
        return float(surface[key][i])
    j = int(np.abs(surface.ycoordinates).argmin())
    return float(surface[key][i, j])

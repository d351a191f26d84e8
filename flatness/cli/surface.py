"""``flatness surface``: a 1-D or 2-D loss surface around a checkpoint, into a resumable .h5 file."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from pathlib import Path

from flatness.cli.common import SOURCES_HELP, add_command, add_common, add_sources, positive_int, sources_from_args
from flatness.errors import FlatnessError

EXAMPLES = """\
  flatness surface runs/sgd/final.pt --dim 1 --x -1:1:51 --out sgd_1d.h5
  flatness surface runs/sgd/final.pt --dim 2 --x -1:1:51 --y -1:1:51 --samples 1000 --out sgd_2d.h5
  flatness surface runs/sgd/final.pt --dim 2 --x -1:1:51 --y -1:1:51 --out sgd_2d.h5 --resume   # after a kill
  flatness surface runs/sgd/final.pt --dim 2 --directions pca --run runs/sgd --x -40:40:41 --y -20:20:41 --out pca.h5
  flatness surface runs/sgd/final.pt --dim 1 --directions interp --to runs/sam/final.pt --x -0.5:1.5:41 --out line.h5
  flatness surface a.pt --dim 2 --directions interp --to b.pt c.pt --x -0.5:1.5:31 --y -0.5:1.5:31 --out plane.h5
  torchrun --nproc_per_node 2 -m flatness surface runs/sgd/final.pt --dim 2 --x -1:1:51 --y -1:1:51 --out s.h5
  flatness surface runs/sgd/final.pt --dim 2 --directions hessian --x -1:1:41 --y -1:1:41 --out hess.h5
  flatness plot sgd_2d.h5 --kind contour --out sgd_contour.png
  flatness surface my_weights.pt --model mymod.py:build --data mymod.py:data --dim 1 --x=-1:1:21 --out mine.h5

Grid axes are MIN:MAX:N (N points from MIN to MAX, inclusive); negative
bounds work as --x -1:1:51 and as --x=-1:1:51. The file holds xcoordinates,
ycoordinates, train_loss, train_acc (%) [, test_loss, test_acc] as (ny, nx)
arrays, [j, i] = value at (x_i, y_j) (the order of np.meshgrid(x, y), which
loss-landscape's plot_2D reads), plus the directions; missing cells are NaN.

""" + SOURCES_HELP

EVAL_MODES = ("auto", "vmap", "loop")

# Appended to a help text that states its own default: ArgumentDefaultsHelpFormatter then adds none.
_OWN = "%(default).0s"

# Accept "-1:1:51", "-inf:1:3" (refused later with a clear line) as the value of --x / --y
# (argparse otherwise takes a leading "-" for an option).
_NEGATIVE_VALUE = re.compile(r"^-\d+$|^-\d*\.\d+$|^-[\w.+-]*:[-\w.+:]*$")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "surface", "Compute a 1-D or 2-D loss surface around a checkpoint (Li et al. 2018).", EXAMPLES)
    p._negative_number_matcher = _NEGATIVE_VALUE  # type: ignore[attr-defined]
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint (.pt) at the centre, or a run directory (its final.pt)")
    g = p.add_argument_group("grid and directions")
    g.add_argument("--dim", type=int, choices=(1, 2), default=None, help="1 or 2 (default: 2 when --y is given)" + _OWN)
    g.add_argument("--x", default=None, metavar="MIN:MAX:N",
                   help="first axis, e.g. -1:1:51 (or --x=-1:1:51); required except with --directions pca, whose "
                   "default grid (31x31) covers the trajectory with a 20%% margin" + _OWN)
    g.add_argument("--y", default=None, metavar="MIN:MAX:N", help="second axis (2-D)" + _OWN)
    g.add_argument(
        "--directions",
        choices=("filter", "layer", "model", "pca", "interp", "hessian"),
        default=None,
        help="random normalized per filter/layer/model, PCA of --run's checkpoints, towards --to, or the top Hessian "
        "eigenvectors (default: interp with --to, else filter)" + _OWN,
    )
    g.add_argument("--hessian-normalize", choices=("none", "filter"), default="none",
                   help="--directions hessian: unit eigenvectors (none) or filter-normalized (filter)")
    g.add_argument("--ignore", choices=("biasbn", "none"), default=None, help="zero bias and BN directions (default: biasbn for random, none for pca/interp/hessian)" + _OWN)
    g.add_argument("--to", nargs="+", action="extend", default=[], metavar="CKPT",
                   help="interp: the checkpoint at x=1 (and the one at y=1); --to B C or --to B --to C" + _OWN)
    g.add_argument("--run", default=None, metavar="RUN_DIR", help="run directory: trajectory for pca, projected onto 2-D surfaces" + _OWN)
    g.add_argument("--allow-degenerate", action="store_true", help="compute even when a direction is zero or the two are parallel" + _OWN)
    d = p.add_argument_group("data")
    d.add_argument("--samples", type=positive_int, default=None, help="first N samples of the split (default: all)" + _OWN)
    d.add_argument("--split", choices=("train", "val", "test"), default="train", help="which samples the surface is computed on; train: the samples the run trained on (its --val-split hold-out excluded); val: the hold-out; test: the test split")
    d.add_argument("--test", action="store_true", help="also compute test_loss / test_acc on the test split" + _OWN)
    d.add_argument("--batch-size", type=positive_int, default=1000, help="samples per forward pass")
    add_sources(d)
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="FILE.h5", help="output file (default: CKPT_surface_<dim>d.h5 beside the checkpoint)" + _OWN)
    o.add_argument("--resume", action="store_true", help="continue FILE.h5: compute only its missing cells (same settings required)" + _OWN)
    o.add_argument("--chunk-size", type=positive_int, default=None, help="grid points evaluated and written together (default: auto)" + _OWN)
    o.add_argument("--eval-mode", choices=EVAL_MODES, default=None,
                   help="vmap over weight sets or a loop over points (default: auto, vmap on CUDA)" + _OWN)
    o.add_argument("--method", choices=EVAL_MODES, default=None, dest="old_method", help=argparse.SUPPRESS)  # 0.2 spelling, until 0.4
    add_common(o)
    p.set_defaults(func=run)


def _default_out(checkpoint: str, dim: int) -> Path:
    path = Path(checkpoint)
    if path.is_dir():
        return path / f"surface_{dim}d.h5"
    return path.with_name(f"{path.stem}_surface_{dim}d.h5")


def _spec(args: argparse.Namespace):  # noqa: ANN202 - SurfaceSpec, imported lazily (torch)
    from flatness.landscape import SurfaceSpec

    return SurfaceSpec(
        x=args.x, y=args.y, dim=args.dim, directions=args.directions or ("interp" if args.to else "filter"), ignore=args.ignore,
        seed=args.seed, to=tuple(args.to), run=args.run, hessian_normalize=args.hessian_normalize,
        allow_degenerate=args.allow_degenerate, split=args.split, samples=args.samples, test=args.test,
        batch_size=args.batch_size, device=args.device, chunk_size=args.chunk_size, method=_eval_mode(args),
    )


def _eval_mode(args: argparse.Namespace) -> str:
    """``--eval-mode``, or the deprecated ``--method`` of flatness 0.2 (which names the optimizer in ``train``)."""
    if args.old_method is None:
        return args.eval_mode or "auto"
    if args.eval_mode is not None and args.eval_mode != args.old_method:
        raise FlatnessError(f"--method {args.old_method} and --eval-mode {args.eval_mode} disagree; pass --eval-mode only")
    sys.stderr.write(f"warning: surface --method is deprecated (--method is the optimizer in train); use --eval-mode {args.old_method}\n")
    return args.old_method


def run(args: argparse.Namespace) -> int:
    from flatness.landscape import SurfaceFallbackWarning, SurfaceFile, surface_from_checkpoint

    spec = _spec(args)
    output = SurfaceFile(Path(args.out) if args.out else _default_out(args.checkpoint, int(spec.dim)), resume=args.resume, force=args.force)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SurfaceFallbackWarning)
        surface = surface_from_checkpoint(args.checkpoint, output, spec, sources=sources_from_args(args), quiet=args.quiet)
    for w in caught:
        if issubclass(w.category, SurfaceFallbackWarning):
            sys.stderr.write(f"warning: {w.message}\n")
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    # The library leaves the torchrun process group it joined, so ask torchrun's RANK who reports.
    if int(os.environ.get("RANK", "0")) == 0:
        key = surface.default_key()
        values = surface[key]
        grid = " x ".join(str(n) for n in reversed(surface.shape))
        print(
            f"wrote {output.path}: {grid} {key}, min {float(values.min()):.4g}, max {float(values.max()):.4g}"
            f"{_centre_text(surface, key)} ({time.perf_counter() - start:.1f}s)"
        )
    return 0


def _centre_text(surface, key: str) -> str:  # noqa: ANN001 - Surface, imported lazily
    """``", centre V"`` with the value at (0, 0), or nothing when 0 is not a grid point on every axis."""
    import numpy as np

    def zero(coords) -> int | None:  # noqa: ANN001 - np.ndarray
        i = int(np.abs(coords).argmin())
        span = float(coords.max() - coords.min()) or 1.0
        return i if abs(float(coords[i])) <= 1e-9 * span else None

    i = zero(surface.xcoordinates)
    j = zero(surface.ycoordinates) if surface.ycoordinates is not None else 0
    if i is None or j is None:
        return ""
    value = surface[key][i] if surface.ycoordinates is None else surface[key][j, i]
    return f", centre {float(value):.4g}"

"""Make the loss-landscape example figures in ``figures/`` from a short MNIST-1D run.

Trains the 1-D CNN on MNIST-1D with SGD (``flatness.training.train``, epoch
checkpoints kept), then computes with :mod:`flatness.landscape` and draws
with :mod:`flatness.plots.surface`:

- ``surface_1d.png``: filter-normalized 1-D loss and accuracy (train and test);
- ``surface_contour.png``, ``surface_filled.png``, ``surface_heatmap.png``,
  ``surface_3d.png``: a 2-D filter-normalized surface;
- ``surface_pca_trajectory.png``: the surface in the plane of the first two
  PCA directions of the run's checkpoints, with the projected trajectory, on
  the default grid that covers the trajectory;
- ``surface_hessian.png``: the plane of the top two Hessian eigenvectors (unit).

Usage::

    python scripts/make_figures_landscape.py [--out figures] [--work /tmp/landscape_figs] [--epochs 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flatness.landscape import SurfaceFile, SurfaceSpec, read_surface, surface_from_checkpoint
from flatness.plots.surface import plot_surface
from flatness.training import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figures", help="folder for the PNGs")
    parser.add_argument("--work", default="/tmp/flatness_landscape_figures", help="folder for the run and the .h5 files")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--n", type=int, default=41, help="grid points per axis of the 2-D surfaces")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    config = TrainConfig(model="cnn1d", data="mnist1d", method="sgd", epochs=args.epochs, lr=0.05, seed=args.seed)
    result = train(config, work / "run", device="cpu", force=True, quiet=True)
    final = result.run_dir / "final.pt"
    common = {"samples": args.samples, "device": "cpu", "seed": args.seed}

    def surface(name: str, **spec: object):  # noqa: ANN202 - Surface
        return surface_from_checkpoint(final, SurfaceFile(work / name, force=True), SurfaceSpec(**common, **spec), quiet=True)

    s1 = surface("s1.h5", x="-1:1:51", test=True)
    plot_surface(s1, out / "surface_1d.png", kind="line")

    grid = f"-1:1:{args.n}"
    s2 = surface("s2.h5", x=grid, y=grid)
    for kind in ("contour", "filled", "heatmap", "3d"):
        plot_surface(s2, out / f"surface_{kind}.png", kind=kind, vmax=None)

    # no x / y: the grid covers the projected trajectory and the centre with a margin (recorded in the file)
    surface("pca.h5", directions="pca", run=str(result.run_dir))
    plot_surface(read_surface(work / "pca.h5"), out / "surface_pca_trajectory.png", kind="contour", trajectory=True, log=True)
    s4 = surface("hessian.h5", x="-2:2:41", y="-2:2:41", directions="hessian")
    plot_surface(s4, out / "surface_hessian.png", kind="contour")
    last = result.metrics[-1]
    print(f"trained {args.epochs} epochs (test acc {last['test_acc']:.1f}%), figures in {out} ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()

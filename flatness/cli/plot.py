"""``flatness plot``: draw a loss surface (.h5), a Hessian spectral density (.json) or curvature during training (.jsonl)."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from flatness.cli.common import add_command, require_file
from flatness.errors import FlatnessError

EXAMPLES = """\
  flatness plot sgd_1d.h5 --kind line --out sgd_1d.png
  flatness plot sgd_2d.h5 --kind contour --out sgd_contour.png
  flatness plot sgd_2d.h5 --kind filled --log --out sgd_filled.pdf
  flatness plot sgd_2d.h5 --kind heatmap --out sgd_heat.svg
  flatness plot sgd_2d.h5 --kind 3d --vmax 5 --out sgd_3d.png
  flatness plot pca.h5 --kind contour --trajectory --out pca_traj.png
  flatness plot hessian.json --out density.png             # spectral density (log scale; --no-log: linear)
  flatness plot runs/sgd/curvature.jsonl --out c.png       # lambda_max during training (--track-curvature), 2/lr for SGD
  flatness plot runs/sgd --out c.png                       # the same: a run directory holding curvature.jsonl

Surface files written by tomgoldstein/loss-landscape are read too.
"""

_H5 = (".h5", ".hdf5")
_OWN = "%(default).0s"  # appended to help texts that state their own default


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "plot", "Draw a loss surface (.h5), a Hessian spectral density (.json) or curvature during training (.jsonl).", EXAMPLES)
    p.add_argument("input", metavar="FILE", help="surface .h5 (from flatness surface or loss-landscape), hessian .json, "
                   "or curvature.jsonl (or a run directory holding one)")
    p.add_argument("--kind", choices=("line", "contour", "filled", "heatmap", "3d"), default=None, help="surface plot kind (default: line for 1-D, contour for 2-D)" + _OWN)
    p.add_argument("--key", default=None, help="value drawn on 2-D kinds: train_loss (default), train_acc, test_loss, test_acc" + _OWN)
    p.add_argument("--log", action=argparse.BooleanOptionalAction, default=None,
                   help="logarithmic loss / density axis (default: linear for surfaces, log for densities)" + _OWN)
    p.add_argument("--trajectory", action="store_true", help="draw the projected training trajectory (surfaces computed with --run)" + _OWN)
    p.add_argument("--vmax", type=float, default=None, help="top contour level / colour limit, a finite number above the surface's minimum (default: 95th percentile)" + _OWN)
    p.add_argument("--out", required=True, metavar="FIG", help="output figure: .png, .pdf or .svg" + _OWN)
    p.add_argument("--force", action="store_true", help="overwrite an existing figure" + _OWN)
    p.set_defaults(func=run)


def _is_hdf5(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def run(args: argparse.Namespace) -> int:
    src = Path(args.input)
    if src.is_dir():  # a run directory: its tracked curvature
        if not (src / "curvature.jsonl").is_file():
            raise FlatnessError(f"input {src} is a folder without curvature.jsonl; train with --track-curvature N or pass a file")
        src = src / "curvature.jsonl"
    src = require_file(src, "input")
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise FlatnessError(f"--out {out} must end in .png, .pdf or .svg")
    if out.is_dir():
        raise FlatnessError(f"output {out} is a folder, expected a file path")
    if out.exists() and not args.force:
        raise FlatnessError(f"output {out} already exists; pass --force to overwrite it")
    created = [p for p in reversed(out.parents) if not p.exists()]
    try:
        _draw(src, out, args)
    except BaseException:
        for folder in reversed(created):  # a failed plot leaves no new empty folders
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    print(f"wrote {out}")
    return 0


def _draw(src: Path, out: Path, args: argparse.Namespace) -> None:
    if src.suffix.lower() == ".jsonl":
        if args.kind is not None or args.trajectory or args.key is not None or args.vmax is not None:
            raise FlatnessError("--kind, --key, --vmax and --trajectory apply to surface files; curvature.jsonl is drawn as lambda_max against updates")
        from flatness.plots.curvature import plot_curvature_track

        _make_folder(out.parent)
        plot_curvature_track(src, out, **({} if args.log is None else {"log": args.log}))
    elif src.suffix.lower() == ".json":
        try:
            result = json.loads(src.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FlatnessError(f"{src} is not valid JSON: {e}") from None
        if not isinstance(result, dict):
            raise FlatnessError(f"{src} does not hold a hessian result (expected a JSON object)")
        if args.kind is not None or args.trajectory or args.key is not None or args.vmax is not None:
            raise FlatnessError("--kind, --key, --vmax and --trajectory apply to surface files; a .json hessian result is drawn as a spectral density")
        if result.get("density") is None and result.get("per_layer"):  # hessian --per-layer without --density: the bar chart
            from flatness.plots.per_layer import plot_per_layer

            _make_folder(out.parent)
            plot_per_layer(result, out, **({} if args.log is None else {"log": args.log}))
            return
        try:
            from flatness.plots.density import plot_spectral_density
        except ImportError as e:
            raise FlatnessError(f"spectral density plots are not available in this installation ({e})") from None
        _make_folder(out.parent)
        plot_spectral_density(result, out, **({} if args.log is None else {"log": args.log}))
    elif src.suffix.lower() in _H5 or _is_hdf5(src):
        from flatness.plots.surface import plot_surface

        plot_surface(src, out, kind=args.kind, key=args.key, log=bool(args.log), trajectory=args.trajectory, vmax=args.vmax)
    else:
        raise FlatnessError(f"cannot plot {src}: expected a surface .h5 file or a hessian .json result (or a curvature.jsonl)")


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlatnessError(f"cannot create folder {folder}: {e.strerror}") from None

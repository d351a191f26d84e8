"""``flatness compare``: one report comparing checkpoints."""

from __future__ import annotations

import argparse

from flatness.cli.common import SOURCES_HELP, add_command, add_common, add_sources, positive_int, sources_from_args

EXAMPLES = """\
  flatness compare runs/sgd/final.pt runs/sam/final.pt runs/marwp/final.pt --out report
  flatness compare a.pt b.pt --out report --surface 2d --top-k 3 --radii 0 0.01 0.05 0.1
  flatness compare a.pt b.pt --out report --per-layer      # + per-layer (block-diagonal) curvature bar chart
  flatness compare a.pt b.pt c.pt --out report --force   # reuses report/cache for a.pt and b.pt
  flatness compare runs/sgd runs/sam --out report          # run directories: their final.pt
  flatness compare a.pt b.pt --model mymod.py:build --data mymod.py:data --out report   # your own code

""" + SOURCES_HELP


def register(sub: argparse._SubParsersAction) -> None:
    from flatness.report.compare import CompareSettings

    d = CompareSettings()
    p = add_command(sub, "compare", "Compare checkpoints: losses, curvature, sharpness, surfaces -> HTML/Markdown/JSON report.", EXAMPLES)
    p.add_argument("checkpoints", nargs="+", help="checkpoint files (.pt) or run directories")
    p.add_argument("--out", required=True, metavar="DIR", help="report folder")
    p.add_argument("--samples", type=positive_int, default=d.samples, help="first N samples of --split used for every measure")
    p.add_argument("--split", choices=("train", "val", "test"), default=d.split,
                   help="which samples: train = the samples each run trained on (its --val-split hold-out excluded); val = the hold-out; test")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="samples per forward pass (memory only)")
    p.add_argument("--surface", choices=("1d", "2d", "none"), default=d.surface, help="loss surface per checkpoint in the report")
    p.add_argument("--surface-points", type=positive_int, default=d.surface_points, help="points per surface axis")
    p.add_argument("--top-k", type=positive_int, default=d.top_k, help="largest Hessian eigenvalues per checkpoint (Lanczos)")
    p.add_argument("--trace-matvecs", type=positive_int, default=d.trace_matvecs, help="Hessian-vector products for the Hutch++ trace")
    p.add_argument("--density", action="store_true", help="also the SLQ spectral density")
    p.add_argument("--per-layer", nargs="?", const="tensor", default=None, choices=("tensor", "module"),
                   help="also the top eigenvalue and trace of each diagonal Hessian block (a bar chart): per parameter tensor "
                        "(--per-layer alone) or per module, as in hessian --per-layer")
    p.add_argument("--radii", type=float, nargs="+", default=list(d.radii), help="relative radii of the sharpness curve")
    p.add_argument("--draws", type=positive_int, default=d.draws, help="noise draws per radius")
    p.add_argument("--rho", type=float, default=d.rho, help="adversarial sharpness radius")
    add_sources(p.add_argument_group("model, data and loss (default: each checkpoint's own)"))
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flatness.device import resolve_device
    from flatness.report import CompareSettings, compare

    s = CompareSettings(
        samples=args.samples, split=args.split, batch_size=args.batch_size, surface=args.surface, surface_points=args.surface_points,
        top_k=args.top_k, trace_matvecs=args.trace_matvecs, density=args.density,
        per_layer=True if args.per_layer == "tensor" else (args.per_layer or False), radii=tuple(args.radii),
        draws=args.draws, rho=args.rho, seed=args.seed,
    )
    result = compare(args.checkpoints, args.out, s, device=resolve_device(args.device), force=args.force, quiet=args.quiet,
                     sources=sources_from_args(args))
    print(f"report: {result.report_html} ({len(result.computed)} computed, {len(result.reused)} reused, {result.seconds:.1f}s)")
    return 0

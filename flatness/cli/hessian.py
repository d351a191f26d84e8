"""``flatness hessian``: top Hessian eigenvalues, trace and spectral density of a checkpoint."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from flatness.cli.common import (
    SOURCES_HELP,
    add_command,
    add_common,
    add_sources,
    require_file,
    sources_from_args,
)
from flatness.errors import FlatnessError

EXAMPLES = """\
  flatness hessian runs/sgd/final.pt --top-k 5 --out sgd_hessian.json
  flatness hessian runs/marwp/final.pt --trace --density --samples 2000 --out marwp_hessian.json
  flatness hessian resnet18_official.pt --model resnet18 --data cifar10 --data-dir ~/data/cifar-10-batches-py \\
      --samples 5000 --batch-size 500 --device cuda --out r18.json
  torchrun --nproc_per_node 2 -m flatness hessian runs/sgd/final.pt --out sgd_hessian.json
  flatness plot marwp_hessian.json --log --out density.png   # draws the spectral density (needs --density)
  flatness hessian runs/sgd/final.pt --per-layer module --out layers.json     # top eigenvalue and trace per module
  flatness hessian my_weights.pt --model mymod.py:build --data mymod.py:data --out mine.json   # your own code
  flatness hessian runs/lm --loss mymod.py:lm_loss --samples 512 --out lm.json               # a run directory

""" + SOURCES_HELP


# flatness.curvature.operator.BACKENDS, repeated so that building the parser
# does not import torch (tests/cli/test_hessian.py checks they agree).
BACKENDS = ("graph", "backward", "jvp", "linearize")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "hessian",
        "Top Hessian eigenvalues (Lanczos), trace (Hutch++) and spectral density (SLQ) of a checkpoint's loss.",
        EXAMPLES,
    )
    p.add_argument("checkpoint", help="flatness checkpoint, or a plain state_dict with --model")
    p.add_argument("--out", required=True, help="output .json file")
    p.add_argument("--top-k", type=int, default=5, help="number of largest eigenvalues (at most the number of parameters)")
    p.add_argument("--tol", type=float, default=1e-6, help="relative error tolerance of the eigenvalues (error bound r^2/gap)")
    p.add_argument("--max-iter", type=int, default=500, help="most Hessian-vector products for the eigenvalues, the check that none was missed included (at least --top-k)")
    p.add_argument("--trace", action="store_true", help="also estimate the trace")
    p.add_argument("--trace-method", choices=("hutch++", "hutchinson"), default="hutch++", help="trace estimator")
    p.add_argument("--trace-matvecs", type=int, default=99, help="Hessian-vector products for the trace (and per block with --per-layer)")
    p.add_argument("--density", action="store_true", help="also estimate the spectral density (for flatness plot)")
    p.add_argument("--density-steps", type=int, default=80, help="Lanczos steps per density run")
    p.add_argument("--density-runs", type=int, default=2, help="random start vectors for the density")
    p.add_argument(
        "--per-layer", nargs="?", const="tensor", default=None, choices=("tensor", "module"),
        help="also the top eigenvalue and trace of each diagonal block: per parameter tensor (default) or per module",
    )  # fmt: skip
    p.add_argument("--samples", type=int, default=None, help="first N samples of the split (default: all)")
    p.add_argument("--split", choices=("train", "val", "test"), default="train", help="which samples the loss is taken on; train: the samples the run trained on (its --val-split hold-out excluded); val: the hold-out; test: the test split")
    p.add_argument("--batch-size", type=int, default=1000, help="samples per batch (memory only)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="precision of the Hessian-vector products")
    p.add_argument("--backend", choices=BACKENDS, default="graph", help="how Hessian-vector products are computed")
    add_sources(p)
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flatness.checkpoint import resolve_checkpoint_path
    from flatness.curvature.report import hessian_report
    from flatness.device import resolve_device
    from flatness.distributed import init_from_env, local_device
    from flatness.progress import progress

    require_file(resolve_checkpoint_path(args.checkpoint)[0], "checkpoint")  # a run directory stands for its final.pt
    spec = spec_from_args(args)
    out = check_new_output(Path(args.out), args.force)
    device = local_device(resolve_device(args.device))
    dist = init_from_env(device)
    try:
        with progress(total=None, unit="HVP", desc="hessian", quiet=args.quiet or not dist.is_main) as bar:
            result = hessian_report(args.checkpoint, spec, sources=sources_from_args(args), device=device, on_hvp=lambda _count: bar.update(1))
        if dist.is_main:
            write_json(out, result)
            print(summary(result, out))
    finally:
        if dist.active:
            import torch.distributed

            torch.distributed.destroy_process_group()
    return 0


def spec_from_args(args: argparse.Namespace):  # noqa: ANN201 - flatness.curvature.spec.HessianSpec (imports torch)
    """The :class:`flatness.curvature.spec.HessianSpec` the flags name (it validates them)."""
    from flatness.curvature.spec import HessianSpec

    return HessianSpec(
        top_k=args.top_k, tol=args.tol, max_iter=args.max_iter, trace=args.trace, trace_method=args.trace_method,
        trace_matvecs=args.trace_matvecs, density=args.density, density_steps=args.density_steps, density_runs=args.density_runs,
        per_layer=args.per_layer, samples=args.samples, split=args.split, batch_size=args.batch_size, dtype=args.dtype,
        backend=args.backend, seed=args.seed,
    )  # fmt: skip


def check_new_output(out: Path, force: bool) -> Path:
    """Refuse a bad ``--out`` before any work, creating nothing (its folder is made only when writing)."""
    if out.suffix.lower() != ".json":
        raise FlatnessError(f"--out must name a .json file, got {out}")
    if out.is_dir():
        raise FlatnessError(f"output {out} is a folder, expected a file path")
    if out.exists() and not force:
        raise FlatnessError(f"output {out} already exists; pass --force to overwrite it")
    folder = out.parent.absolute()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise FlatnessError(f"cannot create folder {out.parent}: {folder} is a file")
    try:  # fail now, not after the work (a temporary file, deleted at once)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise FlatnessError(f"cannot write to folder {folder}: {e.strerror or e}") from None
    return out


def write_json(out: Path, result: dict) -> None:
    """Create ``out``'s folder and write the result atomically."""
    from flatness.atomic import atomic_write_text

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=2, allow_nan=False) + "\n")
    except OSError as e:
        raise FlatnessError(f"cannot write {out}: {e.strerror or e}") from None


def summary(result: dict, out: Path) -> str:
    """A few human lines about a result of :func:`flatness.curvature.report.hessian_report`."""
    eigs = ", ".join(f"{v:.6g}" for v in result["top_eigenvalues"])
    state = "converged" if result["converged"] else "NOT converged: raise --max-iter or --tol"
    lines = [
        f"hessian of {result['checkpoint']}: {result['model']} on {result['samples']} {result['dataset']} {result['split']} samples, "
        f"{result['num_params']} parameters, {result['dtype']}, BatchNorm {result['bn_mode']}",
        f"  top-{len(result['top_eigenvalues'])} eigenvalues: {eigs}  ({state}, {result['hvp_counts']['eigenvalues']} HVPs)",
    ]
    if result["trace"] is not None:
        err = f" +- {result['trace_stderr']:.3g}" if result["trace_stderr"] is not None else ""
        lines.append(f"  trace: {result['trace']:.6g}{err}  ({result['trace_method']}, {result['hvp_counts']['trace']} HVPs)")
    if result["density"] is not None:
        lines.append(f"  density: {result['density']['num_runs']} SLQ runs x {result['density']['num_steps']} steps ({result['hvp_counts']['density']} HVPs)")
    if result.get("per_layer") is not None:
        top = max(result["per_layer"], key=lambda b: b["top_eigenvalue"])
        lines.append(f"  per layer: {len(result['per_layer'])} blocks, sharpest {top['name']!r} (top eigenvalue {top['top_eigenvalue']:.4g}, {result['hvp_counts']['per_layer']} HVPs)")
    lines.append(f"  wrote {out} ({result['hvp_count']} HVPs, {result['seconds']:.1f} s)")
    return "\n".join(lines)

"""``flatness train``: train a model with a method, write a run directory."""

from __future__ import annotations

import argparse
import json

from pathlib import Path

from flatness.cli.common import add_command, add_common, typed_options
from flatness.errors import FlatnessError

EXAMPLES = """\
  flatness train --method sgd --model cnn1d --data mnist1d --epochs 60 --seed 0 --out runs/sgd
  flatness train --method m-arwp --sigma 0.03 --lam 0.5 --eta 0.1 --beta 0.99 --out runs/marwp
  flatness train --method sam --rho 0.05 --out runs/sam
  flatness train --out runs/sgd --resume             # continue after a crash or kill
  flatness train --model resnet18 --data cifar100 --data-dir ~/data/cifar --epochs 200 \\
      --batch-size 256 --lr 0.1 --weight-decay 1e-3 --cutout 16 --method m-arwp --sigma 0.015
  flatness train --method m-arwp --mix-batches alternate --epochs 60 --out runs/alt   # 120 data epochs, same updates
  flatness train --method sam --val-split 500 --out runs/sam-val   # hold out 500 training samples
  flatness train --method sgd --track-curvature --out runs/eos      # lambda_max within 5 % extra cost (interval chosen)
  flatness train --method sgd --track-curvature 50 --save-every 50 --out runs/eos   # lambda_max every 50 updates, converged
  flatness train --method sam --track-curvature 50 --log tensorboard runs/sam/tb --out runs/sam   # + TensorBoard
  torchrun --nproc_per_node 2 -m flatness train --method sam --out runs/ddp   # DistributedDataParallel
  torchrun --nproc_per_node 2 -m flatness train --method m-arwp --parallel-roles --out runs/par
  flatness train --model mymod.py:build --data mymod.py:data --loss mymod.py:lm_loss --out runs/mine   # your own code

protocol: --epochs E means E epochs' worth of parameter UPDATES for every method, with the LR schedule
stepped per update. The alternate m-(A)RWP scheme (one update per two batches) therefore reads 2E data
epochs, as the official script does; config.json records updates, data_epochs and grad_evals_per_update.
"""


def _model_kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"hidden\": 200}}', got {text!r} ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    from flatness.data import DATASET_NAMES
    from flatness.models import MODEL_NAMES
    from flatness.training.config import SCHEDULES, TRACK_BUDGET_DEFAULT, TrainConfig

    d = TrainConfig()
    p = add_command(sub, "train", "Train a model with a flatness-seeking method; write a run directory.", EXAMPLES)
    g = p.add_argument_group("run")
    g.add_argument("--method", default=d.method, help="sgd, sam, asam, delta-sam, rwp, m-rwp, arwp, m-arwp")
    g.add_argument("--model", default=d.model, metavar="NAME|MODULE:FN", help=f"one of {', '.join(MODEL_NAMES)}, or your own: module:fn / file.py:fn returning an nn.Module")
    g.add_argument("--model-kwargs", type=_model_kwargs, default={}, help="JSON object of model arguments")
    g.add_argument("--data", default=d.data, metavar="NAME|MODULE:FN", help=f"one of {', '.join(DATASET_NAMES)}, or your own: module:fn / file.py:fn returning (train, test)")
    g.add_argument("--data-kwargs", type=_model_kwargs, default={}, help="JSON object of arguments of a --data callable")
    g.add_argument("--data-dir", default=None, help="folder with the CIFAR python-pickle batches")
    g.add_argument("--loss", default=d.loss, metavar="NAME|MODULE:FN", help="cross_entropy, mse, or your own loss(model, batch) -> mean loss")
    g.add_argument("--out", default=None, help="run directory (default runs/METHOD-MODEL-DATA-sSEED)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (that verifies); every option typed must match the run's")
    g.add_argument("--replan-schedule", action="store_true",
                   help="with --resume and another --epochs: replan the LR and sigma schedules over the new length from the current update")
    g.add_argument("--allow-changed", action="append", metavar="code|data",
                   help="with --resume: accept user code or data whose content differs from the run's fingerprint (repeatable)")
    g.add_argument("--save-every", type=int, default=0, help="also checkpoint every N updates within an epoch (0: epoch ends only)")
    g.add_argument("--val-split", type=int, default=d.val_split,
                   help="hold out N training samples (chosen by --seed) as a validation split: not trained on, "
                        "val_loss/val_acc in metrics")
    g.add_argument("--track-curvature", type=int, nargs="?", const=None, default=d.track_curvature, metavar="N",
                   help="lambda_max on the first --track-samples training samples into curvature.jsonl: alone, within "
                        f"--track-budget (default {TRACK_BUDGET_DEFAULT:g}); with N, every N updates to full convergence (0: off)")
    g.add_argument("--track-budget", type=float, default=d.track_budget, metavar="B",
                   help="track within B extra cost over untracked training (0.05: 5 %%); interval and products per point are chosen once")
    g.add_argument("--track-products", type=int, default=d.track_products, metavar="P",
                   help="most Hessian-vector products per tracked point, warm-started; each point records its error bound")
    g.add_argument("--track-trace", action="store_true", help="with --track-curvature, also the Hessian trace (Hutch++)")
    g.add_argument("--track-samples", type=int, default=d.track_samples, help="samples of the fixed analysis batch")
    g.add_argument("--no-epoch-checkpoints", action="store_true", help="keep only last.pt and final.pt")
    g.add_argument("--log", nargs=2, metavar=("KIND", "DIR"), default=None,
                   help="also log metrics and curvature: tensorboard DIR, or your own module:callable DIR")
    add_common(g)
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=d.epochs,
                   help="epochs' worth of updates, equal for every method (alternate m-(A)RWP reads twice the data epochs)")
    o.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per batch (per process under torchrun)")
    o.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the base SGD")
    o.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum, in [0, 1)")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 weight decay of the base SGD")
    o.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    o.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="learning-rate schedule, stepped per update")
    o.add_argument("--cutout", type=int, default=d.cutout, help="cutout square side for CIFAR (0: off)")
    o.add_argument("--no-augment", action="store_true", help="no crop/flip for CIFAR")
    m = p.add_argument_group("method hyperparameters")
    m.add_argument("--rho", type=float, default=None, help="SAM/ASAM/delta-SAM radius (default: 0.5 for asam, 0.05 otherwise)")
    m.add_argument("--adaptive-eta", type=float, default=d.adaptive_eta, help="ASAM's eta")
    m.add_argument("--sigma", type=float, default=d.sigma, help="RWP-family noise std multiplier")
    m.add_argument("--sigma-inc", type=float, default=d.sigma_inc, help="CosineInc: sigma grows to sigma*(1+inc) (0: constant)")
    m.add_argument("--incstd", action="store_true",
                   help="the official --incstd: sigma rises by a cosine from --weight-decay to --sigma over the run")
    m.add_argument("--lam", type=float, default=d.lam, help="m-RWP/m-ARWP weight of the perturbed gradient")
    m.add_argument("--eta", type=float, default=d.eta, help="ARWP's eta")
    m.add_argument("--beta", type=float, default=d.beta, help="ARWP's accumulator decay")
    m.add_argument("--temperature", type=float, default=d.temperature, help="delta-SAM temperature")
    m.add_argument("--mix-batches", choices=("same", "alternate"), default=d.mix_batches, help="m-RWP/m-ARWP batch scheme")
    m.add_argument("--parallel-roles", action="store_true", help="two-role parallel m-(A)RWP (under torchrun, even world size)")
    p.set_defaults(func=run, _parser=p)


# Options that say how to run, not what the run is: typed on a resume, they are not compared.
NOT_SETTINGS = {"resume", "out", "device", "quiet", "force", "replan_schedule", "allow_changed", "log", "command", "func", "_parser", "_argv"}
# Settings that may differ on a resume: bookkeeping that does not change the numbers.
BOOKKEEPING = {"save_every", "keep_epochs"}
FLAG_TO_FIELD = {"no_augment": "augment", "no_epoch_checkpoints": "keep_epochs"}


def _resumed_config(args: argparse.Namespace, saved: dict, fields: dict, out: str):
    """The saved run's settings; every setting typed now, at any value, must equal the saved one.

    ``--epochs`` may differ only with ``--replan-schedule`` (checked by the trainer).

    Raises:
        FlatnessError: one line naming the option, the run's value and the typed one.
    """
    from flatness.training import TrainConfig

    where = Path(out) / "config.json"
    try:
        before = TrainConfig.from_dict(saved)
    except FlatnessError as e:
        raise FlatnessError(f"{where}: {e}") from None
    typed = {FLAG_TO_FIELD.get(d, d) for d in typed_options(args)} - NOT_SETTINGS
    try:
        after = TrainConfig.from_dict({**saved, **{f: fields[f] for f in typed if f in fields}})
    except FlatnessError as e:
        raise FlatnessError(f"--resume: {e}") from None
    for name in sorted(typed & set(fields)):
        then, now = getattr(before, name), getattr(after, name)
        if name == "model_kwargs":  # the run records them resolved (defaults filled in); typed keys must agree
            now = {**then, **now}
        if then == now or name in BOOKKEEPING or name == "epochs":
            continue
        flag = "--" + {"augment": "no-augment", "keep_epochs": "no-epoch-checkpoints"}.get(name, name.replace("_", "-"))
        raise FlatnessError(
            f"--resume: the run in {out} has {flag} {then!r}, but {now!r} was typed; a resumed run keeps its settings "
            f"(drop {flag}, or start a new run with another --out)"
        )
    return after


def _fields(args: argparse.Namespace) -> dict:
    return {
        "model": args.model, "data": args.data, "data_dir": args.data_dir, "model_kwargs": args.model_kwargs,
        "data_kwargs": args.data_kwargs, "loss": args.loss,
        "method": args.method, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "momentum": args.momentum, "weight_decay": args.weight_decay, "nesterov": args.nesterov,
        "schedule": args.schedule, "seed": args.seed, "cutout": args.cutout, "augment": not args.no_augment,
        "val_split": args.val_split, "rho": args.rho, "adaptive_eta": args.adaptive_eta, "sigma": args.sigma,
        "sigma_inc": args.sigma_inc, "incstd": args.incstd, "lam": args.lam, "eta": args.eta, "beta": args.beta,
        "temperature": args.temperature, "mix_batches": args.mix_batches, "parallel_roles": args.parallel_roles,
        "save_every": args.save_every, "keep_epochs": not args.no_epoch_checkpoints,
        "track_curvature": args.track_curvature or 0, "track_trace": args.track_trace, "track_samples": args.track_samples,
        "track_budget": _track_budget(args), "track_products": args.track_products,
    }


def _track_budget(args: argparse.Namespace) -> float:
    """``--track-curvature`` without N means a budget: ``--track-budget``, else the default."""
    from flatness.training.config import TRACK_BUDGET_DEFAULT

    return args.track_budget or (TRACK_BUDGET_DEFAULT if args.track_curvature is None else 0.0)


def run(args: argparse.Namespace) -> int:
    from flatness.hooks import short_name
    from flatness.provenance.fingerprint import parse_allow_changed
    from flatness.training import TrainConfig, train
    from flatness.training.rundir import resume_settings

    fields = _fields(args)
    out = args.out or f"runs/{args.method}-{short_name(args.model)}-{short_name(args.data)}-s{args.seed}"
    saved = resume_settings(out, {}) if args.resume else None
    if args.replan_schedule and not args.resume:
        raise FlatnessError("--replan-schedule changes the plan of a resumed run; it needs --resume")
    if args.allow_changed and not args.resume:
        raise FlatnessError("--allow-changed accepts changes since a run was trained; it needs --resume")
    allow = parse_allow_changed(args.allow_changed)
    config = _resumed_config(args, saved, fields, out) if saved is not None else TrainConfig(**fields)
    from flatness.loggers import make_logger

    logger = make_logger(*args.log) if args.log else None
    try:
        result = train(config, out, device=args.device, resume=args.resume, force=args.force, quiet=args.quiet,
                       replan_schedule=args.replan_schedule, allow_changed=allow, logger=logger)
    finally:
        getattr(logger, "close", lambda: None)()
    if result.is_main:
        last = result.metrics[-1] if result.metrics else {}
        print(
            f"trained {config.method} {config.model} on {config.data}: "
            + (f"test_acc {last['test_acc']:.2f}% " if "test_acc" in last else "")
            + f"test_loss {last.get('test_loss', float('nan')):.4f} "
            f"train_loss {last.get('train_loss', float('nan')):.4f} in {result.seconds:.1f}s -> {result.final}"
        )
    return 0

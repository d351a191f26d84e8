"""A table of bad invocations of every command: one ``error:`` line, exit 2, nothing touched.

Each row runs the real CLI in a subprocess, in its own copy of a folder of
inputs (good and bad checkpoints, surfaces, a finished run, a report, CIFAR
folders laid out wrongly...). A row passes when the command exits with
status 2, prints exactly one line on stderr that starts with ``error:``,
matches the row's regex and carries no traceback, and every file and folder
in the copy is byte-for-byte what it was before (nothing created, changed or
removed). The rows run two at a time; the count of rows handled is printed
at the end of the module.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # about a minute on two cores: ~65 CLI processes

CUDA = torch.cuda.is_available()
NO_CUDA_ONLY = pytest.mark.skipif(CUDA, reason="needs a machine without CUDA")

TRAIN = ["train", "--data", "synthetic", "--model", "mlp", "--epochs", "1", "--device", "cpu", "--quiet"]
SURFACE = ["surface", "--device", "cpu", "--quiet"]
HESSIAN = ["hessian", "--device", "cpu", "--quiet", "--top-k", "1"]
COMPARE = ["compare", "--device", "cpu", "--quiet", "--samples", "100", "--surface", "none"]
X = ["--x", "-1:1:3"]
U_TRAIN = ["train", "--model", "usermod2.py:lin", "--data", "usermod2.py:data", "--epochs", "1", "--device", "cpu", "--quiet"]

USERMOD2 = """\
import torch
from torch import nn


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    return (x[:48], y[:48]), (x[48:], y[48:])


def bad_data():
    raise RuntimeError("boom in data")


def lin():
    return nn.Linear(5, 3)


def one_param():
    return OneParam()


class OneParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return torch.stack([x[:, 0] * self.w, x[:, 1] * 0, x[:, 2] * 0], 1)


def frozen():
    return nn.Linear(5, 3).requires_grad_(False)


def identity():
    return nn.Sequential(nn.Flatten(), nn.Identity())


def constant_loss(model, batch):
    return torch.tensor(1.0)


def nan_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y) * float("nan")


CALLS = [0]


def late_loss(model, batch):
    CALLS[0] += 1
    if CALLS[0] > 3:
        raise KeyError("a key the batch lacks")
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)
"""

ARCHMOD = "import torch\nfrom torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Linear(5, {h}), nn.ReLU(), nn.Linear({h}, 3))\n"



def row(rid: str, argv: list[str], pattern: str, *marks: pytest.MarkDecorator) -> Any:
    """One table row: ``flatness ARGV`` must fail with a message matching ``pattern``."""
    return pytest.param(argv, pattern, id=rid, marks=marks)


ROWS = [
    # --- train -------------------------------------------------------------------------------
    row("train-negative-sigma", TRAIN + ["--method", "rwp", "--sigma", "-0.1", "--out", "new"], r"--sigma must be >= 0, got -0\.1"),
    row("train-negative-track-budget", TRAIN + ["--track-budget", "-0.05", "--out", "new"], r"--track-budget must be in \[0, 100\]"),
    row("train-track-products-alone", TRAIN + ["--track-products", "3", "--out", "new"], r"--track-products needs --track-curvature"),
    row("train-negative-track-products", TRAIN + ["--track-curvature", "--track-products", "-1", "--out", "new"], r"--track-products must be an integer >= 0"),
    row("train-lam-above-1", TRAIN + ["--method", "m-arwp", "--lam", "1.5", "--out", "new"], r"--lam must be in \[0, 1\], got 1\.5"),
    row("train-beta-1", TRAIN + ["--method", "arwp", "--beta", "1", "--out", "new"], r"--beta must be in \[0, 1\), got 1\.0"),
    row("train-rho-0", TRAIN + ["--method", "sam", "--rho", "0", "--out", "new"], r"--rho must be (a finite )?positive( number)?, got 0\.0"),
    row("train-unknown-method", TRAIN + ["--method", "adam", "--out", "new"], r"unknown method 'adam'; expected one of .*m-arwp"),
    row("train-unknown-device", TRAIN + ["--device", "tpu", "--out", "new"], r"unknown device 'tpu'"),
    row("train-unknown-model", TRAIN + ["--model", "resnet99", "--out", "new"], r"unknown model 'resnet99'"),
    row("train-batch-size-0", TRAIN + ["--batch-size", "0", "--out", "new"], r"--batch-size(:| must be a) (expected a )?positive integer, got 0"),
    row("train-lr-nan", TRAIN + ["--lr", "nan", "--out", "new"], r"--lr must be a finite number, got nan"),
    row("train-lr-overflow", TRAIN + ["--lr", "1e300", "--out", "new"], r"--lr must be positive and at most .*got 1e\+300"),
    row("train-sigma-inc-for-sgd", TRAIN + ["--sigma-inc", "1", "--out", "new"], r"--sigma-inc is for the RWP family, not 'sgd'"),
    row("train-cifar-wrong-layout", TRAIN + ["--data", "cifar10", "--model", "resnet18", "--data-dir", "cifar_nested", "--out", "new"],
        r"--data-dir cifar_nested does not hold cifar-10-batches-py/data_batch_1"),
    row("train-cifar-incomplete", TRAIN + ["--data", "cifar10", "--model", "resnet18", "--data-dir", "cifar_partial", "--out", "new"],
        r"lacks data_batch_2, .*test_batch"),
    row("train-cifar-garbage-batch", TRAIN + ["--data", "cifar10", "--model", "resnet18", "--data-dir", "cifar_garbage", "--out", "new"],
        r"cannot read CIFAR batch .*data_batch_1"),
    row("train-existing-out", TRAIN + ["--out", "run"], r"run directory run already exists; pass --resume .* or --force"),
    row("train-force-foreign-folder", TRAIN + ["--out", "cifar_partial", "--force"], r"not a flatness run directory .*refusing to delete"),
    row("train-resume-other-settings", TRAIN + ["--out", "run", "--resume", "--lr", "0.5"], r"the run in run has --lr 0\.1, but 0\.5 was typed"),
    row("train-resume-truncated-last", TRAIN + ["--out", "run_truncated", "--resume"], r"last\.pt cannot be read: it is truncated"),
    row("train-resume-foreign-last", TRAIN + ["--out", "run_foreign_last", "--resume"], r"last\.pt is not a training checkpoint \(it lacks optimizer"),
    row("train-resume-broken-config", TRAIN + ["--out", "run_broken_config", "--resume"], r"config\.json: setting 'lr' must be a float, got 'fast'"),
    row("train-model-kwargs-classes", TRAIN + ["--model-kwargs", '{"num_classes": 3}', "--out", "new"], r"gives 3 outputs, but synthetic has 10 classes"),
    row("train-model-kwargs-negative", TRAIN + ["--model-kwargs", '{"hidden": -3}', "--out", "new"], r"model 'mlp' cannot be built .*negative dimension"),
    # --- surface -----------------------------------------------------------------------------
    row("surface-missing-checkpoint", SURFACE + ["missing.pt", *X, "--out", "s.h5"], r"checkpoint missing\.pt does not exist"),
    row("surface-truncated-checkpoint", SURFACE + ["truncated.pt", *X, "--out", "s.h5"], r"truncated\.pt cannot be read: it is truncated"),
    row("surface-text-as-checkpoint", SURFACE + ["notes.pt", *X, "--out", "s.h5"], r"notes\.pt is not a PyTorch checkpoint"),
    row("surface-json-as-checkpoint", SURFACE + ["hessian.json", *X, "--out", "s.h5"], r"hessian\.json is not a PyTorch checkpoint \(it looks like a JSON file\)"),
    row("surface-folder-as-checkpoint", SURFACE + ["empty_folder", *X, "--out", "s.h5"], r"empty_folder has no final\.pt"),
    row("surface-model-mismatch", SURFACE + ["cnn1d.pt", "--model", "mlp", *X, "--out", "s.h5"], r"holds model 'cnn1d', but --model is 'mlp'"),
    row("surface-grid-min-above-max", SURFACE + ["cnn1d.pt", "--x", "1:0:5", "--out", "s.h5"], r"--x 1:0:5: grid MIN must be smaller than MAX"),
    row("surface-grid-not-numbers", SURFACE + ["cnn1d.pt", "--x", "a:b:c", "--out", "s.h5"], r"--x expects numbers for MIN and MAX"),
    row("surface-grid-zero-points", SURFACE + ["cnn1d.pt", "--x", "-1:1:0", "--out", "s.h5"], r"grid size N must be a positive integer, got 0"),
    row("surface-no-grid", SURFACE + ["cnn1d.pt", "--out", "s.h5"], r"--x MIN:MAX:N is required \(only --directions pca"),
    row("surface-pca-y-without-x", SURFACE + ["cnn1d.pt", "--directions", "pca", "--y", "-1:1:3", "--out", "s.h5"], r"give both --x and --y, or neither"),
    row("surface-samples-0", SURFACE + ["cnn1d.pt", *X, "--samples", "0", "--out", "s.h5"], r"--samples: expected a positive integer, got 0"),
    row("surface-existing-out", SURFACE + ["cnn1d.pt", *X, "--out", "surface.h5"], r"surface\.h5 already exists; pass --resume .* or --force"),
    row("surface-resume-other-settings", SURFACE + ["cnn1d.pt", "--x", "-1:1:5", "--out", "surface.h5", "--resume"], r"cannot resume surface\.h5: .*other settings"),
    row("surface-resume-foreign-h5", SURFACE + ["cnn1d.pt", *X, "--out", "foreign.h5", "--resume"], r"foreign\.h5 is not a surface file written by flatness"),
    row("surface-huge-grid", SURFACE + ["cnn1d.pt", "--x", "-1:1:1000000000000000", "--out", "s.h5"], r"out of memory"),
    # --- hessian -----------------------------------------------------------------------------
    row("hessian-missing-checkpoint", HESSIAN + ["missing.pt", "--out", "h.json"], r"checkpoint missing\.pt does not exist"),
    row("hessian-truncated-checkpoint", HESSIAN + ["truncated.pt", "--out", "h.json"], r"truncated\.pt cannot be read: it is truncated"),
    row("hessian-h5-as-checkpoint", HESSIAN + ["surface.h5", "--out", "h.json"], r"surface\.h5 is not a PyTorch checkpoint \(it looks like an HDF5 file"),
    row("hessian-empty-checkpoint", HESSIAN + ["empty.pt", "--out", "h.json"], r"checkpoint empty\.pt is empty"),
    row("hessian-folder-as-checkpoint", HESSIAN + ["empty_folder", "--out", "h.json"], r"empty_folder has no final\.pt"),
    row("hessian-model-mismatch", HESSIAN + ["cnn1d.pt", "--model", "resnet18", "--out", "h.json"], r"holds model 'cnn1d', but --model is 'resnet18'"),
    row("hessian-state-dict-other-model", HESSIAN + ["plain.pt", "--model", "mlp", "--data", "synthetic", "--out", "h.json"],
        r"plain\.pt does not fit model 'mlp'"),
    row("hessian-not-a-state-dict", HESSIAN + ["numbers.pt", "--out", "h.json"], r"numbers\.pt is neither a flatness checkpoint nor a state_dict"),
    row("hessian-top-k-0", HESSIAN + ["cnn1d.pt", "--top-k", "0", "--out", "h.json"], r"--top-k: expected a positive integer, got 0"),
    row("hessian-tol-negative", HESSIAN + ["cnn1d.pt", "--tol", "-1e-3", "--out", "h.json"], r"--tol: expected a positive number"),
    row("hessian-existing-out", HESSIAN + ["cnn1d.pt", "--out", "hessian.json"], r"output hessian\.json already exists; pass --force"),
    row("hessian-out-unwritable", HESSIAN + ["cnn1d.pt", "--out", "/proc/h.json"], r"cannot write to folder /proc"),
    row("hessian-cuda-missing", HESSIAN + ["cnn1d.pt", "--device", "cuda", "--out", "h.json"], r"CUDA is not available", NO_CUDA_ONLY),
    row("hessian-cifar-incomplete", HESSIAN + ["cnn1d.pt", "--data", "cifar10", "--data-dir", "cifar_partial", "--out", "h.json"], r"lacks data_batch_2"),
    # --- plot --------------------------------------------------------------------------------
    row("plot-foreign-h5", ["plot", "foreign.h5", "--out", "f.png"], r"foreign\.h5 is not a loss surface file"),
    row("plot-missing-input", ["plot", "missing.h5", "--out", "f.png"], r"input missing\.h5 does not exist"),
    row("plot-truncated-h5", ["plot", "truncated.h5", "--out", "f.png"], r"truncated\.h5 cannot be opened as an HDF5 surface file"),
    row("plot-checkpoint", ["plot", "cnn1d.pt", "--out", "f.png"], r"cannot plot cnn1d\.pt: expected a surface \.h5 file or a hessian \.json"),
    row("plot-json-without-density", ["plot", "hessian.json", "--out", "f.png"], r"no spectral density: run flatness hessian with --density"),
    row("plot-existing-out", ["plot", "surface.h5", "--out", "figure.png"], r"output figure\.png already exists; pass --force"),
    row("plot-contour-of-1d", ["plot", "surface.h5", "--kind", "contour", "--out", "f.png"], r"--kind contour needs a 2-D surface"),
    row("plot-malformed-h5", ["plot", "malformed.h5", "--out", "f.png"], r"malformed\.h5"),
    # --- compare -----------------------------------------------------------------------------
    row("compare-missing-checkpoint", COMPARE + ["cnn1d.pt", "missing.pt", "--out", "rep"], r"checkpoint missing\.pt does not exist"),
    row("compare-truncated-checkpoint", COMPARE + ["cnn1d.pt", "truncated.pt", "--out", "rep"], r"truncated\.pt cannot be read: it is truncated"),
    row("compare-other-networks", COMPARE + ["cnn1d.pt", "mlp.pt", "--out", "rep"], r"mlp\.pt holds another network than cnn1d\.pt"),
    row("compare-existing-report", COMPARE + ["cnn1d.pt", "--out", "report"], r"report already holds a report; pass --force"),
    row("compare-rho-0", COMPARE + ["cnn1d.pt", "--rho", "0", "--out", "rep"], r"--rho must be (a finite )?positive( number)?, got 0\.0"),
    # --- demo --------------------------------------------------------------------------------
    row("demo-existing-out", ["demo", "--out", "run", "--device", "cpu", "--quiet"], r"demo folder run already exists; pass --force"),
    row("demo-out-is-file", ["demo", "--out", "cnn1d.pt", "--device", "cpu", "--quiet"], r"--out cnn1d\.pt exists and is not a folder"),
    # --- issue 14: cases a new user hit ------------------------------------------------------
    row("train-seed-overflow", TRAIN + ["--seed", "100000000000000000000", "--out", "new"], r"--seed"),
    row("train-seed-float", TRAIN + ["--seed", "1e20", "--out", "new"], r"--seed"),
    row("train-seed-negative", TRAIN + ["--seed", "-1", "--out", "new"], r"--seed"),
    row("train-resume-fewer-epochs", TRAIN[:5] + ["--epochs", "1", "--device", "cpu", "--quiet", "--out", "run3", "--resume"],
        r"(?i)epoch"),
    row("train-resume-missing-dir", TRAIN + ["--out", "no_such_run", "--resume"], r"no_such_run"),
    row("hessian-other-data", HESSIAN + ["cnn1d_mnist1d.pt", "--data", "synthetic", "--out", "h.json"], r"--allow-other-data"),
    row("hessian-top-k-all-params", HESSIAN[:-2] + ["cnn1d.pt", "--top-k", "100000000", "--out", "h.json"], r"--top-k"),
    row("hessian-max-iter-too-small", HESSIAN[:-2] + ["cnn1d.pt", "--top-k", "5", "--max-iter", "2", "--out", "newdir/h.json"], r"--max-iter"),
    row("hessian-fail-leaves-no-dir", HESSIAN + ["missing.pt", "--out", "newdir/sub/h.json"], r"missing\.pt"),
    row("surface-x-inf", SURFACE + ["cnn1d.pt", "--x=-inf:1:3", "--out", "s.h5"], r"--x"),
    row("surface-x-nan", SURFACE + ["cnn1d.pt", "--x=nan:1:3", "--out", "s.h5"], r"--x"),
    row("surface-interp-to-itself", SURFACE + ["cnn1d.pt", "--directions", "interp", "--to", "cnn1d.pt", *X, "--out", "s.h5"],
        r"--allow-degenerate"),
    row("surface-interp-to-a-copy", SURFACE + ["cnn1d.pt", "--directions", "interp", "--to", "cnn1d_copy.pt", *X, "--out", "s.h5"],
        r"--allow-degenerate"),
    row("surface-plane-same-twice", SURFACE + ["cnn1d.pt", "--dim", "2", "--directions", "interp", "--to", "cnn1d_b.pt", "--to", "cnn1d_b.pt",
                                               *X, "--y=-1:1:3", "--out", "s.h5"], r"--allow-degenerate"),
    row("plot-vmax-negative", ["plot", "surface.h5", "--vmax", "-1", "--out", "f.png"], r"--vmax"),
    row("plot-vmax-nan", ["plot", "surface.h5", "--vmax", "nan", "--out", "f.png"], r"--vmax"),
    row("plot-fail-leaves-no-dir", ["plot", "foreign.h5", "--out", "figs/new/f.png"], r"foreign\.h5"),
    row("compare-radii-nan", COMPARE + ["cnn1d.pt", "--radii", "nan", "--out", "rep"], r"--radii"),
    row("compare-radii-inf", COMPARE + ["cnn1d.pt", "--radii", "0.1,inf", "--out", "rep"], r"--radii"),
    row("compare-radii-negative", COMPARE + ["cnn1d.pt", "--radii=-0.1", "--out", "rep"], r"--radii"),
    row("compare-same-checkpoint-twice", COMPARE + ["cnn1d.pt", "cnn1d.pt", "--out", "rep"], r"cnn1d\.pt"),
    row("demo-one-seed", ["demo", "--out", "d", "--seeds", "1", "--device", "cpu", "--quiet"], r"--seeds"),
    # --- more of each command's values ---------------------------------------------------------
    row("train-epochs-0", TRAIN[:5] + ["--epochs", "0", "--device", "cpu", "--out", "new"], r"--epochs"),
    row("train-epochs-negative", TRAIN[:5] + ["--epochs=-3", "--device", "cpu", "--out", "new"], r"--epochs"),
    row("train-lr-negative", TRAIN + ["--lr=-0.1", "--out", "new"], r"--lr"),
    row("train-weight-decay-negative", TRAIN + ["--weight-decay=-1", "--out", "new"], r"--weight-decay"),
    row("train-momentum-above-1", TRAIN + ["--momentum", "1.5", "--out", "new"], r"--momentum"),
    row("train-sigma-nan", TRAIN + ["--method", "rwp", "--sigma", "nan", "--out", "new"], r"--sigma"),
    row("train-eta-negative", TRAIN + ["--method", "arwp", "--eta=-1", "--out", "new"], r"--eta"),
    row("train-temperature-0", TRAIN + ["--method", "delta-sam", "--temperature", "0", "--out", "new"], r"--temperature"),
    row("train-save-every-negative", TRAIN + ["--save-every=-1", "--out", "new"], r"--save-every"),
    row("train-cutout-negative", TRAIN + ["--cutout=-2", "--out", "new"], r"--cutout"),
    row("train-batch-size-text", TRAIN + ["--batch-size", "many", "--out", "new"], r"--batch-size"),
    row("train-model-kwargs-not-json", TRAIN + ["--model-kwargs", "{hidden: 3", "--out", "new"], r"--model-kwargs"),
    row("train-model-kwargs-list", TRAIN + ["--model-kwargs", "[1, 2]", "--out", "new"], r"--model-kwargs"),
    row("train-unknown-data", TRAIN + ["--data", "imagenet", "--out", "new"], r"imagenet"),
    row("train-data-dir-missing", TRAIN + ["--data", "cifar10", "--model", "resnet18", "--data-dir", "nowhere", "--out", "new"], r"nowhere"),
    row("train-mix-batches-unknown", TRAIN + ["--method", "m-arwp", "--mix-batches", "random", "--out", "new"], r"--mix-batches"),
    row("train-out-is-file", TRAIN + ["--out", "notes.pt"], r"notes\.pt"),
    row("train-user-model-missing-file", TRAIN + ["--model", "nowhere.py:build", "--out", "new"], r"nowhere\.py"),
    row("train-user-model-missing-name", TRAIN + ["--model", "usermod.py:no_such_builder", "--out", "new"], r"no_such_builder"),
    row("train-user-model-not-importable", TRAIN + ["--model", "no_such_package.models:build", "--out", "new"], r"no_such_package"),
    row("surface-dim-3", SURFACE + ["cnn1d.pt", "--dim", "3", *X, "--out", "s.h5"], r"--dim"),
    row("surface-unknown-directions", SURFACE + ["cnn1d.pt", "--directions", "random", *X, "--out", "s.h5"], r"--directions"),
    row("surface-unknown-ignore", SURFACE + ["cnn1d.pt", "--ignore", "bn", *X, "--out", "s.h5"], r"--ignore"),
    row("surface-interp-missing-to", SURFACE + ["cnn1d.pt", "--directions", "interp", "--to", "missing.pt", *X, "--out", "s.h5"], r"missing\.pt"),
    row("surface-batch-size-0", SURFACE + ["cnn1d.pt", *X, "--batch-size", "0", "--out", "s.h5"], r"--batch-size"),
    row("surface-chunk-size-0", SURFACE + ["cnn1d.pt", *X, "--chunk-size", "0", "--out", "s.h5"], r"--chunk-size"),
    row("surface-grid-fractional-n", SURFACE + ["cnn1d.pt", "--x=-1:1:2.5", "--out", "s.h5"], r"--x"),
    row("surface-unknown-split", SURFACE + ["cnn1d.pt", *X, "--split", "val", "--out", "s.h5"], r"--split"),
    row("surface-out-is-folder", SURFACE + ["cnn1d.pt", *X, "--out", "empty_folder"], r"empty_folder"),
    row("hessian-unknown-backend", HESSIAN + ["cnn1d.pt", "--backend", "magic", "--out", "h.json"], r"--backend"),
    row("hessian-unknown-dtype", HESSIAN + ["cnn1d.pt", "--dtype", "float16", "--out", "h.json"], r"--dtype"),
    row("hessian-samples-negative", HESSIAN + ["cnn1d.pt", "--samples=-5", "--out", "h.json"], r"--samples"),
    row("hessian-max-iter-0", HESSIAN + ["cnn1d.pt", "--max-iter", "0", "--out", "h.json"], r"--max-iter"),
    row("hessian-trace-matvecs-0", HESSIAN + ["cnn1d.pt", "--trace", "--trace-matvecs", "0", "--out", "h.json"], r"--trace-matvecs"),
    row("hessian-density-steps-0", HESSIAN + ["cnn1d.pt", "--density", "--density-steps", "0", "--out", "h.json"], r"--density-steps"),
    row("hessian-unknown-loss", HESSIAN + ["cnn1d.pt", "--loss", "hinge", "--out", "h.json"], r"hinge"),
    row("hessian-user-model-missing", HESSIAN + ["plain.pt", "--model", "nowhere.py:build", "--data", "synthetic", "--out", "h.json"], r"nowhere\.py"),
    row("hessian-out-is-folder", HESSIAN + ["cnn1d.pt", "--out", "empty_folder"], r"empty_folder"),
    row("plot-unknown-kind", ["plot", "surface.h5", "--kind", "pie", "--out", "f.png"], r"--kind"),
    row("plot-key-on-1d", ["plot", "surface.h5", "--key", "val_loss", "--out", "f.png"], r"--key applies to 2-D kinds"),
    row("plot-out-unknown-format", ["plot", "surface.h5", "--out", "f.xyz"], r"f\.xyz|xyz"),
    row("plot-folder-as-input", ["plot", "empty_folder", "--out", "f.png"], r"empty_folder"),
    row("compare-draws-0", COMPARE + ["cnn1d.pt", "--draws", "0", "--out", "rep"], r"--draws"),
    row("compare-samples-0", COMPARE[:-4] + ["--surface", "none", "cnn1d.pt", "--samples", "0", "--out", "rep"], r"--samples"),
    row("compare-top-k-0", COMPARE + ["cnn1d.pt", "--top-k", "0", "--out", "rep"], r"--top-k"),
    row("compare-radii-text", COMPARE + ["cnn1d.pt", "--radii", "small", "--out", "rep"], r"--radii"),
    row("compare-unknown-surface", COMPARE[:-2] + ["cnn1d.pt", "--surface", "3d", "--out", "rep"], r"--surface"),
    row("compare-out-is-file", COMPARE + ["cnn1d.pt", "--out", "notes.pt"], r"notes\.pt"),
    row("compare-folder-without-checkpoint", COMPARE + ["empty_folder", "--out", "rep"], r"empty_folder"),
    row("demo-epochs-0", ["demo", "--out", "d", "--epochs", "0", "--device", "cpu", "--quiet"], r"--epochs"),
    row("demo-workers-0", ["demo", "--out", "d", "--workers", "0", "--device", "cpu", "--quiet"], r"--workers"),
    row("demo-unknown-method", ["demo", "--out", "d", "--methods", "sgd", "adam", "--device", "cpu", "--quiet"], r"--methods"),
    row("demo-samples-0", ["demo", "--out", "d", "--samples", "0", "--device", "cpu", "--quiet"], r"--samples"),
    row("demo-unknown-device", ["demo", "--out", "d", "--device", "tpu", "--quiet"], r"tpu"),
    row("no-command", ["frobnicate"], r"frobnicate|invalid choice"),
    # --- provenance (issue 21) ---------------------------------------------------------------------
    row("train-resume-typed-default-lr", ["train", "--out", "run_sam", "--resume", "--lr", "0.1"], r"run_sam has --lr 0\.05, but 0\.1 was typed"),
    row("train-resume-typed-default-seed", ["train", "--out", "run_sam", "--resume", "--seed", "0"], r"has --seed 3, but 0 was typed"),
    row("train-resume-typed-default-method", ["train", "--out", "run_sam", "--resume", "--method", "sgd"], r"has --method 'sam', but 'sgd'"),
    row("train-resume-tracking-off", ["train", "--out", "run_sam", "--resume", "--track-curvature", "0"], r"has --track-curvature 2, but 0"),
    row("train-resume-abbreviated-flag", ["train", "--out", "run_sam", "--resume", "--mom", "0.8"], r"has --momentum 0\.9, but 0\.8"),
    row("train-resume-longer-epochs", ["train", "--out", "run", "--resume", "--epochs", "3"], r"planned for --epochs 1 .*--replan-schedule"),
    row("train-replan-without-resume", TRAIN + ["--replan-schedule", "--out", "new"], r"--replan-schedule .* needs --resume"),
    row("train-allow-changed-without-resume", TRAIN + ["--allow-changed", "data", "--out", "new"], r"--allow-changed .* needs --resume"),
    row("train-resume-nothing-verifies", ["train", "--out", "run_corrupt", "--resume"], r"last\.pt is corrupted.*no other checkpoint .* verifies"),
    row("train-resume-changed-data", ["train", "--out", "run_user", "--resume"], r"'mine\.py:data' now gives other train samples"),
    row("hessian-flipped-low-bit", HESSIAN + ["flipped_low.pt", "--out", "h.json"], r"flipped_low\.pt is corrupted: its content does not match"),
    row("hessian-flipped-exponent", HESSIAN + ["flipped_exp.pt", "--out", "h.json"], r"flipped_exp\.pt is corrupted"),
    row("surface-flipped-low-bit", SURFACE + ["flipped_low.pt", *X, "--out", "s.h5"], r"flipped_low\.pt is corrupted"),
    row("compare-flipped-exponent", COMPARE + ["flipped_exp.pt", "--out", "rep"], r"flipped_exp\.pt is corrupted"),
    row("hessian-foreign-nan", HESSIAN + ["plain_nan.pt", "--model", "cnn1d", "--data", "synthetic", "--out", "h.json"],
        r"plain_nan\.pt holds non-finite weights"),
    row("hessian-changed-data", HESSIAN + ["run_user", "--out", "h.json"], r"now gives other train samples .*--allow-changed data"),
    row("hessian-changed-code", HESSIAN + ["run_user_code", "--out", "h.json"], r"model code .*mine_code\.py differs .*--allow-changed code"),
    row("hessian-allow-changed-unknown", HESSIAN + ["cnn1d.pt", "--allow-changed", "weights", "--out", "h.json"],
        r"unknown --allow-changed 'weights'; expected one of code, data"),
    row("hessian-val-without-split", HESSIAN + ["run", "--split", "val", "--out", "h.json"], r"trained without --val-split"),
    row("surface-val-without-split", SURFACE + ["run", "--split", "val", *X, "--out", "s.h5"], r"trained without --val-split"),
    row("compare-val-without-split", COMPARE + ["run", "--split", "val", "--out", "rep"], r"trained without --val-split"),
    row("hessian-samples-beyond-trained-on", HESSIAN + ["run_val", "--samples", "250", "--out", "h.json"],
        r"--samples 250 is more than the 200 samples of the train split \(samples the run trained on\)"),
    row("train-model-kwargs-name", TRAIN + ["--model-kwargs", '{"name": 1}', "--out", "new"], r"model kwargs may not set 'name' for model 'mlp'"),


    # --- issue 23: tracebacks and silent acceptances a user met ---------------------------------
    row("train-user-data-raises", TRAIN[:5] + ["--data", "usermod2.py:bad_data", "--model", "usermod2.py:lin", "--epochs", "1", "--quiet",
                                               "--device", "cpu", "--out", "new"], r"data callable 'usermod2\.py:bad_data' raised RuntimeError: boom in data"),
    row("train-user-loss-raises-later", U_TRAIN + ["--loss", "usermod2.py:late_loss", "--batch-size", "8", "--out", "new"],
        r"loss 'usermod2\.py:late_loss' raised KeyError"),
    row("train-all-parameters-frozen", U_TRAIN[:1] + ["--model", "usermod2.py:frozen"] + U_TRAIN[3:] + ["--out", "new"], r"all its parameters frozen"),
    row("train-no-parameters", U_TRAIN[:1] + ["--model", "usermod2.py:identity"] + U_TRAIN[3:] + ["--out", "new"], r"has no parameters"),
    row("train-constant-loss", U_TRAIN + ["--loss", "usermod2.py:constant_loss", "--out", "new"], r"does not depend on the parameters"),
    row("train-diverges-at-step-1", TRAIN + ["--lr", "3e38", "--out", "new"], r"training diverged: .*checkpoint is none, so new is removed"),
    row("train-track-curvature-past-run", TRAIN + ["--track-curvature", "100000", "--out", "new"],
        r"--track-curvature 100000 is more than the run's \d+ updates, so nothing would be tracked"),
    row("train-track-samples-past-split", TRAIN + ["--track-curvature", "1", "--track-samples", "100000", "--out", "new"],
        r"--track-samples 100000 is more than the \d+ training samples"),
    row("train-resume-changed-architecture", U_TRAIN[:1] + ["--model", "archmod.py:build"] + U_TRAIN[3:] + ["--allow-changed", "code",
                                                    "--out", "run_arch", "--resume"], r"holds another architecture .*size mismatch for 0\.weight"),
    row("train-seed-2-31", TRAIN + ["--seed", "2147483648", "--out", "new"], r"--seed: expected an integer in \[0, 2147483647\]"),
    row("surface-hessian-dim-2-one-parameter", SURFACE + ["one.pt", "--directions", "hessian", "--dim", "2", *X, "--y=-1:1:3", "--out", "s.h5"],
        r"--directions hessian --dim 2 needs 2 Hessian eigenvectors, but the model has 1 trainable parameter"),
    row("surface-one-point-axis", SURFACE + ["cnn1d.pt", "--x=-1:1:1", "--out", "s.h5"], r"N=1 computes MIN=-1 only"),
    row("surface-nan-loss-at-centre", SURFACE + ["lin.pt", "--loss", "usermod2.py:nan_loss", *X, "--out", "s.h5"], r"loss at the centre is nan"),
    row("surface-user-data-raises", SURFACE + ["lin.pt", "--data", "usermod2.py:bad_data", "--allow-other-data", *X, "--out", "s.h5"],
        r"data callable 'usermod2\.py:bad_data' raised RuntimeError"),
    row("surface-eval-mode-and-old-method-disagree", SURFACE + ["cnn1d.pt", *X, "--method", "loop", "--eval-mode", "vmap", "--out", "s.h5"],
        r"--method loop and --eval-mode vmap disagree"),
    row("hessian-huge-weight", HESSIAN + ["huge.pt", "--samples", "100", "--out", "h.json"], r"Hessian-vector products overflow"),
    row("hessian-user-data-raises", HESSIAN + ["lin.pt", "--data", "usermod2.py:bad_data", "--allow-other-data", "--out", "h.json"],
        r"data callable 'usermod2\.py:bad_data' raised RuntimeError"),
    row("compare-huge-weight", COMPARE + ["huge.pt", "--out", "rep/sub"], r"huge\.pt: the Hessian-vector products overflow"),
    row("compare-nan-loss", COMPARE + ["nan_loss.pt", "--out", "rep"], r"nan_loss\.pt: the loss is nan"),
    row("compare-one-surface-point", COMPARE[:-2] + ["cnn1d.pt", "--surface", "1d", "--surface-points", "1", "--out", "rep"], r"--surface-points 1"),
    row("demo-seed-past-range", ["demo", "--out", "d", "--seed", "2147483647", "--device", "cpu", "--quiet"], r"--seed 2147483647 with --seeds 3"),
]


def _save(path: Path, model: str, dataset: str = "synthetic", seed: int = 0) -> None:
    from flatness.checkpoint import save_checkpoint
    from flatness.models import build_model

    torch.manual_seed(seed)
    kw = {"in_features": 40, "num_classes": 10}
    net = build_model(model, **kw)
    save_checkpoint(path, {"model": model, "model_kwargs": kw, "dataset": dataset, "config": {"model": model, "data": dataset},
                           "state_dict": net.state_dict(), "metrics": [], "epoch": 0, "step": 0})


def _cli_ok(root: Path, *argv: str) -> None:
    """Make an input with the real command (so the inputs do not depend on library signatures)."""
    r = run_cli(*argv, cwd=root, timeout=300)
    assert r.returncode == 0, f"building inputs: flatness {' '.join(argv)} failed:\n{r.stderr[-2000:]}"


def _build_inputs(root: Path) -> None:
    """Every file the rows name (good ones too: most rows must fail on one flag, not on a missing file)."""
    import h5py
    import numpy as np

    from flatness.models import build_model

    _save(root / "cnn1d.pt", "cnn1d")
    _save(root / "mlp.pt", "mlp")
    torch.save(build_model("cnn1d", in_features=40, num_classes=10).state_dict(), root / "plain.pt")
    torch.save({"numbers": [1, 2, 3]}, root / "numbers.pt")
    data = (root / "cnn1d.pt").read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "empty.pt").write_bytes(b"")
    (root / "notes.pt").write_text("not a checkpoint\n")
    (root / "hessian.json").write_text(json.dumps({"top_eigenvalues": [1.0], "density": None}) + "\n")
    (root / "figure.png").write_bytes(b"\x89PNG\r\n\x1a\n an existing figure")
    (root / "empty_folder").mkdir()

    _cli_ok(root, "surface", "cnn1d.pt", "--x=-1:1:3", "--out", "surface.h5", "--device", "cpu", "--quiet")
    (root / "truncated.h5").write_bytes((root / "surface.h5").read_bytes()[:1000])
    with h5py.File(root / "foreign.h5", "w") as f:
        f["images"] = np.zeros((4, 8, 8))
    with h5py.File(root / "malformed.h5", "w") as f:
        f["xcoordinates"] = np.linspace(-1, 1, 5)
        f["train_loss"] = np.zeros(7)

    _cli_ok(root, *TRAIN[:5], "--epochs", "1", "--batch-size", "64", "--no-epoch-checkpoints", "--device", "cpu", "--quiet", "--out", "run")
    _cli_ok(root, *TRAIN[:5], "--epochs", "3", "--batch-size", "64", "--no-epoch-checkpoints", "--device", "cpu", "--quiet", "--out", "run3")
    _save(root / "cnn1d_mnist1d.pt", "cnn1d", dataset="mnist1d")
    shutil.copy(root / "cnn1d.pt", root / "cnn1d_copy.pt")
    _save(root / "cnn1d_b.pt", "cnn1d", seed=1)
    (root / "usermod.py").write_text("import torch\n\ndef build(**kw):\n    return torch.nn.Linear(40, 10)\n")
    _build_issue_23_inputs(root)
    shutil.copytree(root / "run", root / "run_truncated")
    (root / "run_truncated" / "final.pt").unlink()
    last = root / "run_truncated" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:5000])
    shutil.copytree(root / "run", root / "run_foreign_last")
    (root / "run_foreign_last" / "final.pt").unlink()
    shutil.copy(root / "mlp.pt", root / "run_foreign_last" / "checkpoints" / "last.pt")
    shutil.copytree(root / "run", root / "run_broken_config")
    cfg = json.loads((root / "run_broken_config" / "config.json").read_text())
    (root / "run_broken_config" / "config.json").write_text(json.dumps({**cfg, "lr": "fast"}))

    _provenance_inputs(root)

    (root / "report").mkdir()
    (root / "report" / "report.json").write_text("{}\n")
    (root / "report" / "report.html").write_text("<html>an earlier report</html>\n")
    nested = root / "cifar_nested" / "cifar10"  # batches one level too deep
    nested.mkdir(parents=True)
    for name in ["data_batch_1", "test_batch"]:
        (nested / name).write_bytes(b"\x80\x04N.")
    partial = root / "cifar_partial" / "cifar-10-batches-py"
    partial.mkdir(parents=True)
    (partial / "data_batch_1").write_bytes(b"\x80\x04N.")
    garbage = root / "cifar_garbage" / "cifar-10-batches-py"
    garbage.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (garbage / name).write_text("these are not pickles\n")


USER_CODE = """
from pathlib import Path
import torch

def build(**kw):
    return torch.nn.Linear(40, 10)

def data():
    x, y = torch.load(Path(__file__).with_name("points.pt"))
    return (x[:96], y[:96]), (x[96:], y[96:])
"""


def _provenance_inputs(root: Path) -> None:
    """Runs and checkpoints for the provenance rows: a SAM run, damaged files, user code and data changed after training."""
    from tests.reliability.corrupt import flip_byte

    _cli_ok(root, *TRAIN[:5], "--epochs", "1", "--batch-size", "64", "--method", "sam", "--lr", "0.05", "--seed", "3",
            "--momentum", "0.9", "--track-curvature", "2", "--track-samples", "16", "--device", "cpu", "--quiet", "--out", "run_sam")
    _cli_ok(root, *TRAIN[:5], "--epochs", "1", "--batch-size", "64", "--val-split", "56", "--device", "cpu", "--quiet", "--out", "run_val")
    shutil.copy(root / "cnn1d.pt", root / "flipped_low.pt")
    flip_byte(root / "flipped_low.pt", "state_dict", "features.0.weight", byte=0, mask=0x01)
    shutil.copy(root / "cnn1d.pt", root / "flipped_exp.pt")
    flip_byte(root / "flipped_exp.pt", "state_dict", "features.0.weight", byte=3, mask=0x40)
    state = torch.load(root / "plain.pt", weights_only=True)
    next(iter(state.values())).view(-1)[0] = float("inf")
    torch.save(state, root / "plain_nan.pt")
    shutil.copytree(root / "run", root / "run_corrupt")
    for ckpt in [root / "run_corrupt" / "final.pt", root / "run_corrupt" / "checkpoints" / "last.pt"]:
        flip_byte(ckpt, "state_dict", "net.0.weight", byte=1, mask=0x10)
    g = torch.Generator().manual_seed(0)
    torch.save((torch.randn(128, 40, generator=g), torch.randint(0, 10, (128,), generator=g)), root / "points.pt")
    (root / "mine.py").write_text(USER_CODE)
    (root / "mine_code.py").write_text(USER_CODE)
    for spec, out in (("mine.py", "run_user"), ("mine_code.py", "run_user_code")):
        _cli_ok(root, "train", "--model", f"{spec}:build", "--data", f"{spec}:data", "--epochs", "1", "--batch-size", "32",
                "--device", "cpu", "--quiet", "--out", out)
    g = torch.Generator().manual_seed(1)  # after training: other samples of the same shapes, and edited code
    torch.save((torch.randn(128, 40, generator=g), torch.randint(0, 10, (128,), generator=g)), root / "points.pt")
    (root / "mine_code.py").write_text(USER_CODE + "\n# edited after training\n")


def _save_user(path: Path, model: str, state_dict: dict) -> None:
    from flatness.checkpoint import save_checkpoint

    save_checkpoint(path, {"model": model, "model_kwargs": {}, "dataset": "usermod2.py:data",
                           "config": {"model": model, "data": "usermod2.py:data"}, "state_dict": state_dict, "metrics": [], "epoch": 0, "step": 0})


def _build_issue_23_inputs(root: Path) -> None:
    """User code that raises or does not train, one-parameter and huge-weight checkpoints, a run whose model code changed."""
    from flatness.models import build_model

    (root / "usermod2.py").write_text(USERMOD2)
    torch.manual_seed(0)
    _save_user(root / "lin.pt", "usermod2.py:lin", torch.nn.Linear(5, 3).state_dict())
    _save_user(root / "one.pt", "usermod2.py:one_param", {"w": torch.ones(1)})
    kw = {"in_features": 40, "num_classes": 10}
    for name, scale in (("huge.pt", 1e19), ("nan_loss.pt", 1e38)):  # finite loss, overflowing products / a NaN loss
        torch.manual_seed(0)
        net = build_model("mlp", **kw)
        state = net.state_dict()
        first = next(k for k in state if k.endswith("weight"))
        state[first][0].fill_(scale)
        from flatness.checkpoint import save_checkpoint

        save_checkpoint(root / name, {"model": "mlp", "model_kwargs": kw, "dataset": "synthetic", "config": {"model": "mlp", "data": "synthetic"},
                                      "state_dict": state, "metrics": [], "epoch": 0, "step": 0})
    (root / "archmod.py").write_text(ARCHMOD.format(h=4))
    _cli_ok(root, *U_TRAIN[:1], "--model", "archmod.py:build", *U_TRAIN[3:], "--out", "run_arch")
    (root / "archmod.py").write_text(ARCHMOD.format(h=6))  # the model's code changed after the run started


def _snapshot(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file (``"dir"`` for folders) under ``root``."""
    snap = {}
    for p in sorted(root.rglob("*")):
        snap[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


def _run_row(inputs: Path, where: Path, argv: list[str]):  # noqa: ANN202 - (CompletedProcess, before, after)
    shutil.copytree(inputs, where, symlinks=True)
    before = _snapshot(where)
    result = run_cli(*argv, cwd=where, timeout=300)
    return result, before, _snapshot(where)


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """Start every selected row (two at a time); the tests collect the results in table order."""
    inputs = tmp_path_factory.mktemp("inputs")
    _build_inputs(inputs)
    rows_dir = tmp_path_factory.mktemp("rows")
    selected = {item.callspec.id for item in request.session.items if item.originalname == "test_bad_invocation" and item.module is sys.modules[__name__]}
    pool = ThreadPoolExecutor(max_workers=2)
    futures: dict[str, Future] = {}
    for p in ROWS:
        if p.id not in selected or any(m.name == "skipif" and m.args[0] for m in p.marks):
            continue
        futures[p.id] = pool.submit(_run_row, inputs, rows_dir / p.id, p.values[0])
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def handled_log():
    log: list[tuple[str, bool]] = []
    yield log
    handled = sum(ok for _, ok in log)
    missed = [rid for rid, ok in log if not ok]
    sys.stderr.write(f"\n[reliability] bad inputs handled: {handled} of {len(log)}" + (f" (not handled: {missed})" if missed else "") + "\n")


@pytest.mark.parametrize(("argv", "pattern"), ROWS)
def test_bad_invocation(argv: list[str], pattern: str, request: pytest.FixtureRequest, bad_runs: dict, handled_log: list) -> None:
    rid = request.node.callspec.id
    result, before, after = bad_runs[rid].result()
    lines = result.stderr.splitlines()
    problems = []
    if result.returncode != 2:
        problems.append(f"exit status {result.returncode}, expected 2")
    if "Traceback" in result.stderr:
        problems.append("a traceback on stderr")
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr, expected 1")
    elif not lines[0].startswith("error: "):
        problems.append("the stderr line does not start with 'error: '")
    elif not re.search(pattern, lines[0]):
        problems.append(f"the message does not match {pattern!r}")
    if before != after:
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        problems.append(f"files touched: {changed}")
    handled_log.append((rid, not problems))
    assert not problems, f"flatness {' '.join(argv)}: {'; '.join(problems)}\nstderr:\n{result.stderr[-3000:]}"


def test_table_is_big_enough() -> None:
    commands = {p.values[0][0] for p in ROWS}
    assert len(ROWS) >= 100
    assert {"train", "surface", "hessian", "plot", "compare"} <= commands

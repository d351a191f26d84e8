"""The offline demo behind ``flatness demo``: train three methods on MNIST-1D, then compare.

SGD, SAM and m-ARWP train the 1-D CNN with the same budget of gradient
evaluations (SAM spends two per batch, so it gets half the epochs; m-ARWP
uses the official alternate scheme - clean gradient on batch t, perturbed on
batch t+1 - one per batch, like SGD), then :func:`flatness.report.compare` measures all three. Everything
is offline and takes a few minutes on two CPU cores.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from flatness.errors import FlatnessError
from flatness.report import CompareResult, CompareSettings, compare
from flatness.training import TrainConfig, train
from flatness.training.methods import grad_evals_per_batch

# method -> hyperparameters (the rest: TrainConfig defaults)
DEMO_METHODS: dict[str, dict] = {
    "sgd": {},
    "sam": {"rho": 0.05},
    "m-arwp": {"sigma": 0.03, "lam": 0.5, "eta": 0.1, "beta": 0.99, "mix_batches": "alternate"},
}


@dataclass
class DemoResult:
    out: Path
    report: CompareResult
    budget: dict[str, str]
    summary: str


def run_demo(
    out: str | Path,
    *,
    budget_epochs: int = 60,
    seed: int = 0,
    device: str = "auto",
    force: bool = False,
    quiet: bool = True,
    settings: CompareSettings | None = None,
) -> DemoResult:
    """Train SGD, SAM and m-ARWP on MNIST-1D and write a comparison report.

    Args:
        out: demo folder: ``runs/<method>/`` and ``report/``.
        budget_epochs: gradient-evaluation budget in epochs of one gradient
            per batch (SGD and m-ARWP train this many epochs, SAM half).
        force: replace an existing demo folder (only one made by the demo).

    Returns:
        The report and a printable summary.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FlatnessError(f"demo folder {out} already exists; pass --force to replace it")
        if not (out / "runs").is_dir():
            raise FlatnessError(f"--force: {out} was not made by flatness demo (no runs/); refusing to delete it")
        shutil.rmtree(out / "runs")
        shutil.rmtree(out / "report", ignore_errors=True)
    finals, budget = [], {}
    for method, hyper in DEMO_METHODS.items():
        probe = TrainConfig(model="cnn1d", data="mnist1d", method=method, seed=seed, **hyper)
        evals = grad_evals_per_batch(probe)
        if budget_epochs % evals:
            raise FlatnessError(f"--budget-epochs {budget_epochs} is not divisible by {evals} ({method} spends {evals} per batch)")
        probe.epochs = budget_epochs // evals
        result = train(probe, out / "runs" / method, device=device, quiet=quiet)
        finals.append(result.final)
        budget[method] = f"{probe.epochs} epochs x {evals} gradient evaluation(s) per batch"
    s = settings or CompareSettings(surface="2d", density=True)
    report = compare(finals, out / "report", s, device=device, quiet=quiet)
    lines = [f"MNIST-1D, cnn1d, equal budget of {budget_epochs} gradient-evaluation epochs, seed {seed}:"]
    for e in report.entries:
        lines.append(
            f"  {e['label']:8s} test acc {e['test_acc']:6.2f}%  test loss {e['test_loss']:.4f}  "
            f"lambda_max {e['top_eigenvalues'][0]:8.3f}  trace {e['trace']:9.2f}  ({budget[e['method']]})"
        )
    lines.append(f"report: {report.report_html}")
    return DemoResult(out, report, budget, "\n".join(lines))

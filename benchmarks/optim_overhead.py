"""Step-time overhead of the optim methods over SGD, in units of the noise floor.

The noise floor is the cost of drawing the perturbation once: one
``normal_`` over a tensor with as many elements as the model has parameters
(the least any random-weight-perturbation step must spend). For every method
the script prints, in one process, on a CIFAR ResNet-18 (batch 16 by default):

    floor-relative overhead = (method update - k x SGD update) / floor

with k the forward-backward passes per update (1: RWP, ARWP; 2: m-RWP,
m-ARWP, SAM, ASAM), in two ways:

* ``own``: the optimizer's own time per update, outside the closure, best of
  a few updates whose closure hands out recorded gradients instead of running
  forward + backward. The closures of both sides then cost the same by
  construction, so the difference is the optimizer's work alone; other load
  on the machine hardly disturbs it.
* ``real-own``: the optimizer's time outside the closures inside real updates
  (forward + backward run for real, then subtracted), best of ``--steps``;
  includes what the real passes leave behind (allocator, caches).
* ``e2e``: real updates with forward + backward, interleaved across methods,
  best of ``--steps``. Includes every real cost, but one forward-backward is
  ~10x the floor, so machine load shows up here first.

Then the ARWP perturbation of ``flatness.optim.noise`` against a
straightforward per-parameter transcription of the official code
(github.com/nblt/mARWP), and with a GPU the host synchronisations per update
(``torch.cuda.set_sync_debug_mode``).

Target (issue 16): ARWP and m-ARWP overhead <= 1.5 floors.

    OMP_NUM_THREADS=1 python benchmarks/optim_overhead.py --threads 1   # ~1.5 min on one core
    python benchmarks/optim_overhead.py --device cuda --batch-size 256
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flatness import optim  # noqa: E402
from flatness.optim.noise import filterwise_noise_into, fisher_like, update_fisher_  # noqa: E402

# (label, class or None for SGD, method kwargs, forward-backward passes per update = k)
METHODS = [
    ("sgd", None, {}, 1),
    ("rwp", optim.RWP, {"sigma": 0.01}, 1),
    ("arwp", optim.ARWP, {"sigma": 0.01, "eta": 0.1, "beta": 0.99}, 1),
    ("m-rwp", optim.MRWP, {"sigma": 0.015, "lam": 0.5}, 2),
    ("m-arwp", optim.MARWP, {"sigma": 0.015, "lam": 0.5, "eta": 0.1, "beta": 0.99}, 2),
    (
        "m-arwp alternate",
        optim.MARWP,
        {"sigma": 0.015, "lam": 0.5, "eta": 0.1, "beta": 0.99, "mix_batches": "alternate"},
        2,
    ),
    ("sam", optim.SAM, {"rho": 0.05}, 2),
    ("asam", optim.ASAM, {"rho": 0.5}, 2),
]
TARGETS = {"arwp": 1.5, "m-arwp": 1.5}


# --------------------------------------------------------------------- model
class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _ResNet18(nn.Module):
    """The common CIFAR ResNet-18 (kuangliu layout), used if flatness is absent."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(_Block(cin, cout, stride), _Block(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def build_resnet18() -> tuple[nn.Module, str]:
    try:
        from flatness.models import build_model

        return build_model("resnet18", num_classes=10), "flatness.models resnet18"
    except Exception:  # the benchmark must run without the rest of the toolkit
        return _ResNet18(10), "local CIFAR ResNet-18"


# ------------------------------------------------------------------- timing
_CLOCK = {"fn": time.perf_counter}


def _clock() -> float:
    return _CLOCK["fn"]()


def _use_clock(device: torch.device) -> str:
    """CPU: this process's CPU time (user + system), which other processes on
    a shared machine hardly disturb; GPU: wall time around synchronisations."""
    if device.type == "cpu":
        _CLOCK["fn"] = time.process_time
        return "process CPU time"
    _CLOCK["fn"] = time.perf_counter
    return "wall time"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One model + optimizer; times updates and the closure time inside them."""

    def __init__(self, label, cls, kwargs, base_model, x, y, device) -> None:
        self.label, self.device, self.x, self.y = label, device, x, y
        self.model = copy.deepcopy(base_model)
        base = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
        if cls is None:
            self.opt = torch.optim.SGD(self.model.parameters(), **base)
        else:
            self.opt = cls(self.model.parameters(), torch.optim.SGD, model=self.model, seed=0, **base, **kwargs)
        self.per_sample = getattr(self.opt, "per_sample_closure", False)
        self.calls = 2 if kwargs.get("mix_batches") == "alternate" else 1  # step calls per update
        self.step_times: list[float] = []
        self.closure_times: list[float] = []
        self.syncs: list[int] = []

    def real_closure(self, timer: list[float]):
        def closure() -> torch.Tensor:
            _sync(self.device)
            t0 = _clock()
            out = self.model(self.x)
            if self.per_sample:
                loss = F.cross_entropy(out, self.y, reduction="none")
            else:
                loss = F.cross_entropy(out, self.y)
                loss.backward()
            _sync(self.device)
            timer.append(_clock() - t0)
            return loss

        return closure

    def replay_closure(self, grads: list[torch.Tensor], timer: list[float]):
        """Stands in for forward + backward: hands out recorded gradients."""
        params = list(self.model.parameters())
        loss = torch.zeros((), device=self.device)

        def closure() -> torch.Tensor:
            _sync(self.device)
            t0 = _clock()
            for p, g in zip(params, grads):
                p.grad = g.clone()
            _sync(self.device)
            timer.append(_clock() - t0)
            return loss

        return closure

    def update(self, make_closure) -> tuple[float, float, int]:
        """One optimizer update; returns (seconds, seconds inside closures, host syncs)."""
        timer: list[float] = []
        count_syncs = self.device.type == "cuda"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if count_syncs:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                _sync(self.device)
                t0 = _clock()
                for _ in range(self.calls):
                    closure = make_closure(timer)
                    if isinstance(self.opt, optim.PerturbedOptimizer):
                        self.opt.step(closure)
                    else:
                        self.opt.zero_grad(set_to_none=True)
                        closure()
                        self.opt.step()
                _sync(self.device)
                elapsed = _clock() - t0
            finally:
                if count_syncs:
                    torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        return elapsed, sum(timer), syncs


def record_gradients(base_model, x, y) -> list[torch.Tensor]:
    model = copy.deepcopy(base_model)
    F.cross_entropy(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def noise_floor(n_weights: int, device: torch.device, repeats: int) -> float:
    """Seconds of one ``normal_`` over ``n_weights`` values (best of ``repeats``)."""
    flat = torch.empty(n_weights, device=device)
    flat.normal_()  # first touch of the memory
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = _clock()
        flat.normal_()
        _sync(device)
        times.append(_clock() - t0)
    return min(times)


def time_methods(base_model, x, y, device, steps: int, repeats: int) -> tuple[list[Runner], dict[str, float]]:
    """Own time per update from replayed gradients (min of ``repeats``; no
    forward/backward, so it is cheap to repeat and robust to machine load),
    then ``steps`` real updates per method, interleaved across methods."""
    runners = [Runner(label, cls, kw, base_model, x, y, device) for label, cls, kw, _ in METHODS]
    grads = record_gradients(base_model, x, y)  # also warms up the convolution kernels
    samples: dict[str, list[float]] = {r.label: [] for r in runners}
    for i in range(repeats + 2):  # 2 warm-up rounds create the lazily allocated state
        for r in runners if i % 2 == 0 else runners[::-1]:  # interleaved: load drift hits all alike
            elapsed, inside, _ = r.update(lambda timer, r=r: r.replay_closure(grads, timer))
            if i >= 2:
                samples[r.label].append(elapsed - inside)
    own = {label: min(times) for label, times in samples.items()}
    for r in runners:  # one real warm-up update each (allocator, kernels)
        r.update(r.real_closure)
    order = list(range(len(runners)))
    for step in range(steps):
        for i in order if step % 2 == 0 else order[::-1]:
            elapsed, inside, syncs = runners[i].update(runners[i].real_closure)
            runners[i].step_times.append(elapsed)
            runners[i].closure_times.append(inside)
            runners[i].syncs.append(syncs)
    return runners, own


def report_methods(runners: list[Runner], own: dict[str, float], floor: float, device: torch.device) -> None:
    best = {r.label: min(r.step_times) for r in runners}
    # the optimizer's own time inside real updates: update minus its closures
    real_own = {r.label: min(t - c for t, c in zip(r.step_times, r.closure_times)) for r in runners}
    print(f"\nnoise floor (one normal_ over all parameters): {floor * 1e3:.1f} ms; "
          f"SGD update: {best['sgd'] * 1e3:.0f} ms end to end (best of {len(runners[0].step_times)}), "
          f"SGD's own work {own['sgd'] * 1e3:.1f} ms\n")
    header = (f"{'method':<18}{'k':>3}{'own ms':>9}{'own /floor':>12}{'real-own /floor':>17}"
              f"{'e2e ms':>9}{'e2e /floor':>12}{'target':>9}")
    if device.type == "cuda":
        header += f"{'syncs/update':>14}"
    print(header)
    print("-" * len(header))
    for (label, _, _, k), r in zip(METHODS, runners):
        own_rel = (own[label] - k * own["sgd"]) / floor
        real_rel = (real_own[label] - k * real_own["sgd"]) / floor
        e2e_rel = (best[label] - k * best["sgd"]) / floor
        target = TARGETS.get(label)
        line = (f"{label:<18}{k:>3}{own[label] * 1e3:>9.1f}{own_rel:>12.2f}{real_rel:>17.2f}"
                f"{best[label] * 1e3:>9.0f}{e2e_rel:>12.2f}{('<= ' + str(target)) if target else '':>9}")
        if device.type == "cuda":
            line += f"{statistics.mean(r.syncs):>14.1f}"
        print(line)
    print("\nk: forward-backward passes per update. Each column is (method - k x SGD) / floor of:")
    print("  own: the optimizer's own time per update, closures replaying recorded gradients;")
    print("  real-own: the same inside real updates (update time minus its forward-backward passes);")
    print("  e2e: the whole real update (one forward-backward is ~10 floors: load shows here first).")


# ------------------------------------------------------ perturbation generation
def official_arwp_perturb(params, state, sigma: float, eta: float) -> None:
    """ARWP.first_step of the official code (utils.py), one parameter at a time."""
    for p in params:
        state[p]["old_p"] = p.data.clone()
        sh = p.data.shape
        sh_mul = int(math.prod(sh[1:]))
        fisher = None
        if "old_g" in state[p]:
            fisher = state[p]["old_g"].view(sh[0], -1).sum(dim=1, keepdim=True).repeat(1, sh_mul).view(sh)
        if p.dim() > 1:
            e_w = p.data.view(sh[0], -1).norm(dim=1, keepdim=True).repeat(1, sh_mul).view(sh)
            e_w = torch.normal(0, (sigma + 1e-16) * e_w).to(p)
        else:
            e_w = torch.empty_like(p.data)
            e_w.normal_(0, sigma * (p.data.view(-1).norm().item() + 1e-16))
        if fisher is not None:
            e_w /= torch.sqrt(1 + eta * fisher)
        p.data.add_(e_w)


def official_arwp_restore(params, state, beta: float) -> None:
    """ARWP.second_step of the official code, without the base step."""
    for p in params:
        p.data = state[p]["old_p"]
        if "old_g" not in state[p]:
            state[p]["old_g"] = p.grad.clone() ** 2
        else:
            state[p]["old_g"] = state[p]["old_g"] * beta + p.grad.clone() ** 2


def _timed(perturb, restore, device) -> tuple[float, float]:
    """Seconds for ``perturb`` alone and for ``perturb`` + ``restore``."""
    _sync(device)
    t0 = _clock()
    perturb()
    _sync(device)
    t1 = _clock()
    restore()
    _sync(device)
    return t1 - t0, _clock() - t0


def _count_syncs(fn) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@torch.no_grad()
def time_perturbation(base_model, device, repeats: int, count_syncs: bool) -> None:
    sigma, eta, beta = 0.01, 0.1, 0.99
    model = copy.deepcopy(base_model)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2

    # optim.noise: the code the optimizers run (w + eps drawn into a second
    # buffer, the parameters pointed at it and back; see flatness.optim.wrapper)
    buffers = [torch.empty_like(p) for p in params]
    originals: list[torch.Tensor] = []
    fisher = [fisher_like(p) for p in params]
    gen = torch.Generator(device=device).manual_seed(0)
    foreach = device.type != "cpu"

    def ours_perturb():
        filterwise_noise_into(params, buffers, sigma=sigma, fisher=fisher, eta=eta, generator=gen, foreach=foreach)
        originals[:] = [p.data for p in params]
        for p, b in zip(params, buffers):
            p.data = b

    def ours_restore():
        for p, w in zip(params, originals):
            p.data = w
        update_fisher_(fisher, [p.grad for p in params], beta=beta, foreach=foreach)

    # the official logic
    state: dict = {p: {} for p in params}

    def off_perturb():
        official_arwp_perturb(params, state, sigma, eta)

    def off_restore():
        official_arwp_restore(params, state, beta)

    ours, official = [], []
    for i in range(repeats + 1):  # first round: warm-up (accumulators exist afterwards)
        a = _timed(ours_perturb, ours_restore, device)
        b = _timed(off_perturb, off_restore, device)
        if i:
            ours.append(a)
            official.append(b)
    gen_ours, all_ours = min(t[0] for t in ours), min(t[1] for t in ours)
    gen_off, all_off = min(t[0] for t in official), min(t[1] for t in official)
    n_weights = sum(p.numel() for p in params)
    print(f"\nARWP perturbation, {len(params)} tensors, {n_weights / 1e6:.1f} M weights (best of {repeats}, ms):")
    print(f"{'':<36}{'optim':>9}{'official':>10}{'speed-up':>10}")
    for label, ours_t, off_t in [
        ("noise generation (w + eps)", gen_ours, gen_off),
        ("+ restore w + accumulator update", all_ours, all_off),
    ]:
        print(f"{label:<36}{ours_t * 1e3:>9.1f}{off_t * 1e3:>10.1f}{off_t / ours_t:>9.1f}x")
    print(f"accumulator size: optim {sum(f.numel() for f in fisher):,} values, "
          f"official {sum(s['old_g'].numel() for s in state.values()):,}")
    if count_syncs:
        syncs_ours = _count_syncs(lambda: (ours_perturb(), ours_restore()))
        syncs_off = _count_syncs(lambda: (off_perturb(), off_restore()))
        print(f"host syncs per perturbation + restore: optim {syncs_ours}, official {syncs_off}")


# ---------------------------------------------------------------------- main
def _load() -> str:
    try:
        return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


def run_on(device: torch.device, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    base_model, model_name = build_resnet18()
    base_model = base_model.to(device).train()
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    n_weights = sum(p.numel() for p in base_model.parameters())
    threads = f"{torch.get_num_threads()} threads, " if device.type == "cpu" else ""
    print(f"\n=== {model_name} ({n_weights / 1e6:.1f} M weights), batch {args.batch_size}x3x32x32, "
          f"device {device}, {threads}torch {torch.__version__}, {_load()}")
    clock = _use_clock(device)
    print(f"    {args.repeats} replayed + {args.steps} real updates per method; clock: {clock}")
    runners, own = time_methods(base_model, x, y, device, args.steps, args.repeats)
    floor = noise_floor(n_weights, device, args.repeats)
    report_methods(runners, own, floor, device)
    time_perturbation(base_model, device, args.repeats, count_syncs=device.type == "cuda")
    print(f"\n({_load()} at the end)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="real timed updates per method (default 6)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"),
        help="auto (default): the CPU, then the GPU too if one is available",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on the CPU")
    parser.add_argument("--repeats", type=int, default=5,
                        help="replayed updates per method and repeats of the perturbation timing (default 5)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = {"cpu": ["cpu"], "cuda": ["cuda"]}.get(args.device)
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in devices:
        run_on(torch.device(name), args)


if __name__ == "__main__":
    main()

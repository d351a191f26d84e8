"""Flatness-seeking training methods as torch optimizers (torch only).

Random weight perturbation - Li et al., TMLR 2024, "Revisiting Random Weight
Perturbation for Efficiently Improving Generalization": :class:`RWP`,
:class:`ARWP`, :class:`MRWP`, :class:`MARWP`, the schedule :class:`CosineInc`
and the two-role parallel :class:`ParallelMARWP` / :class:`ParallelMRWP`.
Sharpness-aware minimization - :class:`SAM` (Foret et al., 2021),
:class:`ASAM` (Kwon et al., 2021), :class:`DeltaSAM` (Zhou et al., 2022).

Every optimizer wraps a base optimizer class and is stepped once per batch::

    opt = MARWP(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                weight_decay=1e-3, sigma=0.015, lam=0.5, eta=0.1, beta=0.99,
                model=model)
    loss = opt.step(closure)   # closure: forward + backward, returns the loss

(:class:`DeltaSAM`'s closure returns per-sample losses instead; see there.)
With ``mix_batches="alternate"`` only every second call updates the weights
(``opt.last_step_updated``); wrap a per-update LR scheduler in
:class:`StepOnUpdate`. :func:`asam_param_groups` splits a model into ASAM's
adaptive and non-adaptive groups as the official ASAM code does.
"""

from .bn import disable_running_stats
from .delta_sam import DeltaSAM
from .parallel import ParallelMARWP, ParallelMRWP, split_roles
from .rwp import ARWP, MARWP, MRWP, RWP
from .sam import ASAM, SAM, asam_param_groups
from .schedule import CosineInc, StepOnUpdate
from .wrapper import PerturbedOptimizer

__all__ = [
    "ARWP",
    "ASAM",
    "CosineInc",
    "DeltaSAM",
    "MARWP",
    "MRWP",
    "ParallelMARWP",
    "ParallelMRWP",
    "PerturbedOptimizer",
    "RWP",
    "SAM",
    "StepOnUpdate",
    "asam_param_groups",
    "disable_running_stats",
    "split_roles",
]

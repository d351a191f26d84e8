"""Loss landscapes: directions, surfaces, trajectories (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets").

Public API::

    from flatness.landscape import SurfaceSpec, SurfaceFile, loss_surface, surface_from_checkpoint, read_surface
    from flatness.landscape import random_directions, interpolation_directions, pca_directions

- :class:`SurfaceSpec`: what to compute (grid, directions, data, evaluation),
  validated once; :class:`SurfaceFile`: where it goes.
- :func:`loss_surface`: 1-D/2-D surface of any ``nn.Module`` on fixed batches,
  in memory or into a resumable .h5 file.
- :func:`surface_from_checkpoint`: what ``flatness surface`` runs.
- :func:`read_surface`: read a surface file (ours or loss-landscape's).
"""

from flatness.landscape.directions import (
    interpolation_directions,
    model_weights,
    normalize_direction,
    random_direction,
    random_directions,
)
from flatness.landscape.evaluate import evaluate_points, evaluate_points_reference
from flatness.landscape.hessian_directions import hessian_directions
from flatness.landscape.grid import Axis, parse_axis
from flatness.landscape.pca import PCAResult, pca_directions, project_trajectory, run_checkpoints
from flatness.landscape.storage import Surface, read_surface
from flatness.landscape.spec import SurfaceFile, SurfaceSpec
from flatness.landscape.surface import SurfaceFallbackWarning, loss_surface, surface_from_checkpoint

__all__ = [
    "Axis",
    "PCAResult",
    "Surface",
    "SurfaceFallbackWarning",
    "SurfaceFile",
    "SurfaceSpec",
    "evaluate_points",
    "evaluate_points_reference",
    "hessian_directions",
    "interpolation_directions",
    "loss_surface",
    "model_weights",
    "normalize_direction",
    "parse_axis",
    "pca_directions",
    "project_trajectory",
    "random_direction",
    "random_directions",
    "read_surface",
    "run_checkpoints",
    "surface_from_checkpoint",
]

"""Figures (matplotlib, imported lazily inside each function; Agg canvas, no pyplot state).

- :mod:`flatness.plots.surface`: loss surfaces (1-D curve, contour, filled
  contour, heatmap, 3-D surface, trajectory over contour).
- :mod:`flatness.plots.density`: Hessian spectral density.
- :mod:`flatness.plots.per_layer`: per-layer (block-diagonal) curvature bars.
- :mod:`flatness.plots.curvature`: lambda_max during training with the SGD stability lines.
- :mod:`flatness.plots.style`: colour = method, line style / marker = seed, legends outside the data.
"""

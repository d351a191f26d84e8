"""Figures (matplotlib, imported lazily inside each function; Agg canvas, no pyplot state).

- :mod:`flatness.plots.surface`: loss surfaces (1-D curve, contour, filled
  contour, heatmap, 3-D surface, trajectory over contour).
"""

"""Checkpoint comparison reports (``flatness compare``): compute, cache, draw, render."""

from flatness.report.compare import CompareResult, CompareSettings, compare

__all__ = ["CompareResult", "CompareSettings", "compare"]

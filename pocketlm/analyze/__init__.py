"""Data analysis over tables: `analyze` labels or extracts fields row by row, `report` sums them up."""

from pocketlm.analyze.label import analyze

__all__ = ["analyze"]

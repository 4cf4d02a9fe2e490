"""Data analysis over tables: `analyze` labels or extracts fields row by row, `report` sums them up,
`embed` (embed.py) gives sentence vectors, nearest rows, themes and near-duplicates."""

from pocketlm.analyze.label import analyze

__all__ = ["analyze"]  # embed: pocketlm.analyze.embed.embed (not re-exported: it would shadow its module)

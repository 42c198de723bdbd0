"""Sufficient statistics of greedy forward selection.

- gfs.stats.gram: GramStats (G = U U^T, b = U y, ||y||^2, count), built streaming from batches,
  merged, all-reduced, saved and loaded;
- gfs.stats.layers: the statistics of a Linear / Conv2d layer's input channels as candidates,
  without forming the N x M contributions.
"""

from .gram import DEFAULT_CHUNK, FORMAT, VERSION, GramStats, identical_rows
from .layers import conv2d_contributions, conv2d_stats, layer_stats, linear_contributions, linear_stats

__all__ = [
    "GramStats",
    "FORMAT",
    "VERSION",
    "DEFAULT_CHUNK",
    "identical_rows",
    "linear_stats",
    "conv2d_stats",
    "layer_stats",
    "linear_contributions",
    "conv2d_contributions",
]

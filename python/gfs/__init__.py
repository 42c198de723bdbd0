"""gfs: greedy forward selection for pruning neural networks.

    sel = gfs.select(features, targets, k)   # features (N, M): one row per candidate

See DESIGN.md for the math; gfs_kernels holds the backends ("naive", "torch", "cpu", ...).
"""
from .select import backends, select
from .selection import Selection

__version__ = "0.1.0"
__all__ = ["select", "Selection", "backends", "__version__"]

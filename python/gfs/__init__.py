"""gfs: greedy forward selection for pruning neural networks.

    sel = gfs.select(features, targets, k)   # features (N, M): one row per candidate

See DESIGN.md for the math; gfs_kernels holds the backends ("naive", "torch", "cpu", ...).
"""
from .select import backends, select
from .selection import Selection
from .prune import PruneResult, prune  # gfs.prune is the function; helpers: from gfs.prune import save, load, ...

__version__ = "0.1.0"
__all__ = ["select", "Selection", "backends", "prune", "PruneResult", "__version__"]

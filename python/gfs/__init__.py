"""gfs: greedy forward selection for pruning neural networks.

    sel = gfs.select(features, targets, k)   # features (N, M): one row per candidate
    stats = gfs.GramStats(N); stats.update(features_batch, targets_batch); gfs.select(stats, k=k)

See docs/design.md for the math; gfs_kernels holds the backends ("naive", "torch", "cpu", ...).
"""

from .pruning import PruneResult, prune  # gfs.prune is the function; helpers: from gfs.pruning import save, load, ...
from .select import backends, select
from .selection import Selection
from .stats import GramStats

__version__ = "0.1.0"
__all__ = ["select", "Selection", "GramStats", "backends", "prune", "PruneResult", "__version__"]

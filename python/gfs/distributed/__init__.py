"""Greedy forward selection with the candidates sharded across torch.distributed ranks.

Algorithm 2 of "How Much Pre-training Is Enough to Discover a Good Subnetwork?" (Appendix D):
each rank holds a disjoint block of candidates and the same target. A step is a local search on
every rank, then all ranks agree on the best candidate (ties to the lowest global index) and
apply the same update. The selection is the one a single process makes on all candidates, and
every rank returns the same :class:`gfs.Selection`, with global indices.

- :func:`select_sharded`: every step rule (uniform, line_search, refit), on the streaming engine
  (each rank holds rows of U) or the Gram engine (each rank holds rows of G: :class:`GramShard`).
  The rules' loops are those of gfs.engines, run through a :class:`~gfs.distributed.shard.Shard`.
- The first collective agrees on every option and input fact (gfs.distributed.agree): a bad input
  or a mismatch raises on every rank, naming the rank; `timeout=` bounds every collective
  (gfs.distributed.comm), so a rank that raised elsewhere or died ends the others with an error.
- Data-parallel statistics (the other way to use several processes) are
  :meth:`gfs.GramStats.all_reduce`.

Bytes per step and the plan for many ranks: docs/design.md section 7.
"""

from __future__ import annotations

from .agree import agree
from .comm import DEFAULT_TIMEOUT, CollectiveError, Comm, as_timeout
from .shard import Shard
from .sharded import GramShard, rows_of, select_sharded

__all__ = ["select_sharded", "GramShard", "rows_of", "check_every_rank", "CollectiveError", "DEFAULT_TIMEOUT", "Shard"]


def check_every_rank(error: BaseException | None, *, what: str, group=None, timeout=DEFAULT_TIMEOUT) -> None:
    """One collective: return on every rank when no rank passes an `error`, else raise on every
    rank the first failing rank's error, naming it (e.g. after each rank has read its input)."""
    comm = Comm(group, as_timeout(timeout))
    with comm.bounded():
        agree(comm, {}, {}, error, what)

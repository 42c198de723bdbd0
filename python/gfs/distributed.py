"""Greedy forward selection with the candidates sharded across torch.distributed ranks.

Algorithm 2 of "How Much Pre-training Is Enough to Discover a Good Subnetwork?" (Appendix D):
each rank holds a disjoint block of candidates (rows of U) and the same target y. A step is a
local search on every rank (one pass over its own rows, through the usual backend), then the
best (score, index) over all ranks is agreed on, the rank that owns the winner broadcasts its
row u_j* (M numbers) and every rank applies the same update. The selection is the one a single
process would make on the concatenated rows (ties to the lowest global index), and every rank
returns the same :class:`gfs.Selection`, with global indices.

Per step the ranks exchange three scalars (two all-reduce MIN, one MAX for the Frank-Wolfe gap)
and one row of M numbers; nothing of size N crosses the network.

Data-parallel statistics (the other way to use several processes) are
:meth:`gfs.GramStats.all_reduce`.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from gfs_kernels.base import accumulation_dtype

from . import _scale
from . import _validation as check
from .engines import uniform
from .engines.plan import backend_for
from .selection import Selection

__all__ = ["select_sharded"]

_NO_EXPONENT = -(1 << 20)  # the exponent gathered for an all-zero shard (or an invalid one)


def select_sharded(shard, targets, k, *, replacement=True, eps=None, backend="auto", group=None) -> Selection:
    """The uniform greedy rule over candidates split across the ranks of ``group``.

    Parameters
    ----------
    shard : Tensor (N_r, M) or (N_r, *S)
        This rank's candidates. Global indices follow rank order: rank 0's rows are
        0 .. N_0 - 1, rank 1's come next, and so on. Every rank needs at least one row.
    targets : Tensor (M,) or (*S)
        The target y; the same on every rank (checked).
    k, replacement, eps, backend
        As in :func:`gfs.select` (the uniform step rule, Algorithm 2); ``backend`` runs the
        local search on each rank ("auto": the fastest usable one there).
    group : ProcessGroup, optional
        Default: the world. ``torch.distributed`` must be initialised.

    Returns
    -------
    Selection
        The same on every rank: global ``indices``, ``weights`` of length sum_r N_r, losses, gaps,
        ``dense_loss`` of the uniform average of all candidates; ``notes["ranks"]`` holds the
        world size and ``notes["offset"]`` this rank's first global index.

    Every rank must call this with the same k, replacement, eps and targets. A bad input on any
    rank raises on every rank (the one with the bad input says what is wrong), so no rank is
    left waiting in a collective.
    """
    t0 = time.perf_counter()
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group(...) on every rank "
            "first, or use gfs.select for one process"
        )
    comm = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    )
    rank, world = dist.get_rank(group), dist.get_world_size(group)

    error = None
    try:
        eps = check.check_options("uniform", eps, replacement)
        U, y, amax = check.features_and_targets(shard, targets, "shard")
        chosen, reason = backend_for("stream", U.device, U.dtype, "uniform", backend)
        shape = (U.shape[0], U.shape[1], math.frexp(amax)[1] if amax > 0 else _NO_EXPONENT)
    except (TypeError, ValueError) as exc:
        error, shape = exc, (0, -1, _NO_EXPONENT)
    sizes = _all_gather_ints(shape, comm, group, world)  # (world, 3): rows, M, exponent of max |x|
    failed = [r for r in range(world) if sizes[r][1] < 0]
    if failed:
        if error is not None:
            raise error
        raise ValueError(f"select_sharded: the input on rank(s) {failed} is invalid (see the error raised there)")
    Ms = {m for _, m, _ in sizes}
    if len(Ms) != 1:
        raise ValueError(
            f"shard: every rank needs the same M (entries per candidate); got {[m for _, m, _ in sizes]} by rank"
        )
    rows = [n for n, _, _ in sizes]
    N, M = sum(rows), U.shape[1]
    offset = sum(rows[:rank])
    k = check.check_k(k, N, bool(replacement))

    # one exact power-of-two rescale for all ranks where the magnitudes need it (as gfs.select)
    top = max(x for _, _, x in sizes)
    scale = _scale.rescale_exponent(math.ldexp(0.5, top), U.dtype, M) if top > _NO_EXPONENT else 0
    if scale:
        U, y = _scale.ldexp(U, -scale), _scale.ldexp(y.to(accumulation_dtype(U.dtype)), -scale)
    y_acc = y.to(accumulation_dtype(U.dtype))
    y0 = y.double().to(comm).clone()
    dist.broadcast(y0, _global(0, group), group=group)
    same = torch.tensor([float(torch.equal(y0, y.double().to(comm)))], dtype=torch.float64, device=comm)
    dist.all_reduce(same, op=dist.ReduceOp.MIN, group=group)
    if float(same) < 1:
        raise ValueError("targets differ between ranks: every rank must pass the same target y")

    t1 = time.perf_counter()

    total = U.sum(0, dtype=y_acc.dtype).double().to(comm)
    dist.all_reduce(total, group=group)
    dense = float(((y.double().to(comm) - total / N) ** 2).mean())
    stop_loss = -1.0 if eps is None else dense + math.ldexp(eps, -2 * scale)
    t2 = time.perf_counter()

    res = uniform.stream_loop(
        chosen, U, y_acc, k, bool(replacement), stop_loss, shard=_Shard(U, offset, rows, comm, group)
    )
    t3 = time.perf_counter()
    indices = res.indices.cpu()
    losses, gaps = _scale.ldexp(res.losses.cpu(), 2 * scale), _scale.ldexp(res.gaps.cpu(), 2 * scale)
    dense = _scale.ldexp_float(dense, 2 * scale)
    return Selection(
        indices=indices,
        support=torch.unique(indices),
        weights=res.weights.cpu(),
        losses=losses,
        gaps=gaps,
        dense_loss=dense,
        backend=chosen.name,
        engine="stream",
        step="uniform",
        replacement=bool(replacement),
        reason=f"sharded over {world} ranks (Algorithm 2); local backend: {reason}",
        seconds=t3 - t0,
        timings={"validate": t1 - t0, "dense": t2 - t1, "select": t3 - t2},
        notes={"ranks": world, "offset": offset, "gammas": res.gammas.cpu()},
    )


class _Shard(uniform.Whole):
    """This rank's block of candidates in the uniform loop: the pick is the best (score, index)
    over all ranks (ties to the lowest global index) and its owner broadcasts the row; the gap's
    max is reduced over all ranks. Three scalars and one row of M numbers cross the network a step."""

    def __init__(self, U, offset, rows, comm, group):
        super().__init__(U)
        self.offset, self.rows, self.comm, self.group = offset, rows, comm, group
        self.n = sum(rows)  # larger than every global index
        self.starts = [sum(rows[:q]) for q in range(len(rows))]

    def best(self, score):
        j_local = int(torch.argmin(score))  # first minimum: ties to the lowest local index
        s_local = float(score[j_local])
        s = _reduce(s_local, dist.ReduceOp.MIN, self.comm, self.group)
        j = int(_reduce(self.offset + j_local if s_local == s else self.n, dist.ReduceOp.MIN, self.comm, self.group))
        owner = max(q for q in range(len(self.rows)) if self.starts[q] <= j)
        mine = self.offset <= j < self.offset + self.U.shape[0]
        u = (
            self.U[j - self.offset].double().to(self.comm)
            if mine
            else torch.empty(self.U.shape[1], dtype=torch.float64, device=self.comm)
        )
        dist.broadcast(u, _global(owner, self.group), group=self.group)
        return j, (j - self.offset if mine else None), u

    def max(self, value):
        return _reduce(value, dist.ReduceOp.MAX, self.comm, self.group)


def _reduce(value: float, op, comm, group) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=comm)
    dist.all_reduce(t, op=op, group=group)
    return float(t)


def _all_gather_ints(pair, comm, group, world) -> list:
    mine = torch.tensor(pair, dtype=torch.int64, device=comm)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return [tuple(int(v) for v in o) for o in out]


def _global(group_rank: int, group) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)

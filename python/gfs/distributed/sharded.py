"""select_sharded: validate on each rank -> agree (one all-gather) -> the rule's loop through a
Shard -> the same Selection on every rank."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import gfs_kernels
from gfs_kernels.base import accumulation_dtype

from .. import _scale
from .. import _validation as check
from ..engines import gram, line_search, refit, uniform
from ..engines.plan import Plan, backend_for
from ..select import _selection, _stats_exponent
from ..selection import Selection
from ..stats import GramStats
from .agree import agree
from .comm import DEFAULT_TIMEOUT, Comm, as_timeout
from .shard import Shard


def rows_of(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi): the block of n candidates that `rank` of `world` holds when they are split in rank
    order as evenly as possible (block sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


@dataclass
class GramShard:
    """One rank's rows of the sufficient statistics, for the Gram engine sharded: G[lo:hi, :]
    (all N columns), b[lo:hi], and the shared ||y||^2 and count. G must be exactly symmetric
    (gfs.GramStats always is): a rank reads G[j, its rows] as its own G[its rows, j].

    Attributes: G (n_r, N) float64, b (n_r,) float64, yy float, count int, offset (lo, this
    block's first global index), precision (the least precise product dtype that built G:
    float32 or float64; it sets the rounding tolerances)."""

    G: torch.Tensor
    b: torch.Tensor
    yy: float
    count: int
    offset: int
    precision: torch.dtype = torch.float64

    @classmethod
    def from_stats(cls, stats: GramStats, rank: int | None = None, world: int | None = None) -> GramShard:
        """Rows `rows_of(stats.n, rank, world)` of `stats` (validated first). rank and world default
        to this process's in the default group; a statistics file is loaded and validated the
        same way on every rank."""
        if rank is None or world is None:
            rank, world = dist.get_rank(), dist.get_world_size()
        stats.validate("stats")
        lo, hi = rows_of(stats.n, rank, world)
        return cls(
            stats.G[lo:hi].clone(), stats.b[lo:hi].clone(), float(stats.yy), int(stats.count), lo, stats.precision
        )


def select_sharded(
    shard,
    targets=None,
    k=None,
    *,
    step: str = "uniform",
    replacement: bool = True,
    eps: float | None = None,
    backend: str = "auto",
    group=None,
    timeout=DEFAULT_TIMEOUT,
) -> Selection:
    """Greedy forward selection over candidates split across the ranks of ``group``.

    Every rank calls it with its block of the candidates; every rank returns the Selection a
    single process makes on all of them (:func:`gfs.select` with the same rule), with global
    indices. Each step is a local search per rank and an agreement on the winner (Algorithm 2 of
    "How Much Pre-training Is Enough to Discover a Good Subnetwork?", Appendix D).

    Parameters
    ----------
    shard : Tensor (N_r, M) or (N_r, *S), ndarray, or GramShard
        This rank's candidates: rows of U (the streaming engine), or its rows of the statistics
        (:class:`GramShard`: the Gram engine; then ``targets`` is None). Global indices follow
        rank order: rank 0's rows first. Every rank needs at least one candidate.
    targets : Tensor (M,) or (*S), optional
        The target y, the same on every rank (checked), with features.
    k, step, replacement, eps
        As in :func:`gfs.select`, the same on every rank (checked).
    backend : str
        The streaming engine's backend for each rank's pass over its rows ("auto": the fastest
        usable one; every rank must end up with the same). The Gram engine runs the rules'
        torch loops ("auto" or "torch").
    group : ProcessGroup, optional
        Default: the world. ``torch.distributed`` must be initialised: gloo for CPU data, NCCL
        for one GPU per rank.
    timeout : float seconds or timedelta
        Bounds every collective of the call (default 5 minutes, the group's own timeout is
        restored afterwards): a rank that never calls, raised before calling or died ends every
        other rank with a :class:`CollectiveError` instead of a hang.

    Returns
    -------
    Selection
        The same on every rank; ``notes["ranks"]``: the number of ranks, ``notes["offset"]``:
        this rank's first global index, ``notes["comm"]``: the collectives and bytes this rank
        received (setup and selection; ``per_step``: bytes and collectives per step).

    Any bad input or option that differs between ranks (k, step, replacement, eps, dtype, M,
    backend, device type, targets) raises on every rank, naming the rank(s).
    """
    t0 = time.perf_counter()
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group(...) on every rank "
            "first, or use gfs.select for one process"
        )
    error: BaseException | None = None
    try:
        limit = as_timeout(timeout)
    except (TypeError, ValueError) as exc:
        limit, error = DEFAULT_TIMEOUT, exc
    comm = Comm(group, limit)
    with comm.bounded():
        job: _Stream | _Gram | None = None
        if error is None:
            try:
                kind = _Gram if isinstance(shard, GramShard) else _Stream
                job = kind(shard, targets, k, step, replacement, eps, backend)
            except (TypeError, ValueError, RuntimeError) as exc:
                error = exc
        table = agree(comm, job.options if job else {}, job.facts if job else {}, error)
        assert job is not None  # (agree raised on every rank otherwise)
        return job.run(comm, table, t0)


class _Job:
    """One rank's checked input, its options (agreed by all ranks) and facts (gathered)."""

    options: dict
    facts: dict

    def _common(self, k, step, replacement, eps) -> None:
        self.eps = check.check_options(step, eps, replacement)
        self.k = check.check_k(k, 1 << 62, True)  # type, >= 1, fits in memory; against N after agreeing
        self.step, self.replacement = step, bool(replacement)

    def _agree_on(self, engine: str, dtype: str, M: int, backend: str, device, targets, **more) -> None:
        """The options every rank must share (agreed in the first collective, in this order)."""
        self.options = dict(engine=engine, step=self.step, k=self.k, replacement=self.replacement, eps=self.eps)
        self.options.update(dtype=dtype, M=M, backend=backend, device=device.type, targets=targets, **more)

    def _setup(self, comm: Comm, table: list, t0: float) -> tuple[list[int], int]:
        """(rows per rank, N), after the checks that need every rank's facts (the same on all)."""
        rows = [f["rows"] for f in table]
        starts = [sum(rows[:r]) for r in range(len(rows))]
        wrong = [r for r, f in enumerate(table) if f.get("offset", starts[r]) != starts[r]]
        if wrong:
            r = wrong[0]
            raise ValueError(
                f"select_sharded: rank {r}'s GramShard starts at row {table[r]['offset']} but ranks 0..{r - 1} hold "
                f"{starts[r]} rows; each rank's rows must follow those of the ranks before it (GramShard.from_stats)"
            )
        N = sum(rows)
        if not self.replacement and self.k > N:
            raise ValueError(
                f"k={self.k} is larger than the {N} candidates on all ranks, and replacement=False forbids picking "
                f"one twice; use k <= {N} or replacement=True"
            )
        self.t_agreed = time.perf_counter()
        return rows, N

    def _finish(self, comm, res, e: int, dense: float, plan: Plan, offset: int, t0: float) -> Selection:
        t3 = time.perf_counter()
        sel = _selection(
            res,
            e,
            dense,
            plan,
            self.step,
            self.replacement,
            plan.reason,
            t3 - t0,
            {"validate": self.t_agreed - t0, "dense": self.t_loop - self.t_agreed, "select": t3 - self.t_loop},
        )
        total = comm.counters()
        loop = {key: total[key] - self.setup[key] for key in total}
        steps = max(1, sel.k)
        per_step = {key: value / steps for key, value in loop.items()}
        sel.notes.update(
            ranks=comm.world, offset=offset, comm={"setup": self.setup, "selection": loop, "per_step": per_step}
        )
        return sel

    def _loop_starts(self, comm) -> None:
        comm.stage = "the selection"
        self.t_loop = time.perf_counter()
        self.setup = comm.counters()  # the agreement and the dense loss


class _Stream(_Job):
    """Rows of U on this rank: the streaming engine, each step one pass over them."""

    def __init__(self, shard, targets, k, step, replacement, eps, backend):
        self._common(k, step, replacement, eps)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, one of {['auto', *gfs_kernels.names()]}")
        self.U, y, amax = check.features_and_targets(shard, targets, "shard")
        self.y = y.to(accumulation_dtype(self.U.dtype))
        self.backend, self.reason = backend_for("stream", self.U.device, self.U.dtype, step, backend)
        dtype = str(self.U.dtype).removeprefix("torch.")
        self._agree_on("stream", dtype, self.U.shape[1], self.backend.name, self.U.device, _digest(self.y))
        self.facts = dict(rows=self.U.shape[0], exponent=math.frexp(amax)[1] if amax > 0 else None)

    def run(self, comm: Comm, table: list, t0: float) -> Selection:
        rows, N = self._setup(comm, table, t0)
        U, y, M = self.U, self.y, self.U.shape[1]
        # one exact power-of-two rescale for all ranks where the magnitudes need it (as gfs.select)
        top = max((f["exponent"] for f in table if f["exponent"] is not None), default=None)
        e = 0 if top is None else _scale.rescale_exponent(math.ldexp(0.5, top), U.dtype, M, self.step)
        if e:
            U, y = _scale.ldexp(U, -e), _scale.ldexp(y, -e)
        total = comm.all_reduce(U.sum(0, dtype=y.dtype).double(), dist.ReduceOp.SUM, "the dense loss")
        dense = float(((y.double() - total.to(y.device) / N) ** 2).mean())
        stop_loss = -1.0 if self.eps is None else dense + _scale.ldexp_float(self.eps, -2 * e)
        shard = Shard(comm, rows, U)
        self._loop_starts(comm)
        if self.step == "uniform":
            res = uniform.stream_loop(self.backend, U, y, self.k, self.replacement, stop_loss, shard=shard)
        else:
            tol = gram.tolerance(torch.float64 if y.dtype == torch.float64 else torch.float32)
            loop = {"line_search": line_search.stream_loop, "refit": refit.stream_loop}[self.step]
            res = loop(self.backend, U, y, self.k, self.replacement, stop_loss, tol, shard=shard)
        if e:
            res.notes["rescaled"] = f"features and targets multiplied by 2^{-e} (exact) on every rank"
        reason = f"sharded over {comm.world} ranks (streaming engine, rows of U per rank); local backend: {self.reason}"
        plan = Plan("stream", self.backend, reason)
        return self._finish(comm, res, 2 * e, _scale.ldexp_float(dense, 2 * e), plan, shard.offset, t0)


class _Gram(_Job):
    """Rows of G on this rank: the Gram engine, each step O(N / ranks) work."""

    def __init__(self, shard: GramShard, targets, k, step, replacement, eps, backend):
        self._common(k, step, replacement, eps)
        if targets is not None:
            raise ValueError(
                "targets must be None when shard is a GramShard: the target is already in the statistics (b, yy)"
            )
        if backend not in ("auto", "torch"):
            gfs_kernels.get(backend)  # an unknown name says so
            raise ValueError(
                f"the sharded Gram engine runs the rules' torch loops over each rank's rows of G, not backend "
                f"{backend!r}; pass backend='auto' or 'torch'"
            )
        G, b, n = shard.G, shard.b, shard.G.shape[0] if isinstance(shard.G, torch.Tensor) else 0
        if not (isinstance(G, torch.Tensor) and isinstance(b, torch.Tensor) and G.dim() == 2 and n >= 1):
            raise ValueError("GramShard.G must be a (n_r, N) tensor with at least one row (this rank's rows of G)")
        if G.dtype != torch.float64 or b.dtype != torch.float64 or tuple(b.shape) != (n,) or b.device != G.device:
            raise ValueError(f"GramShard needs G (n_r, N) and b ({n},), both float64 on one device")
        if not (isinstance(shard.offset, int) and 0 <= shard.offset and shard.offset + n <= G.shape[1]):
            raise ValueError(
                f"GramShard.offset={shard.offset!r}: its {n} rows must lie within G's {G.shape[1]} columns"
            )
        if isinstance(shard.count, bool) or not isinstance(shard.count, int) or shard.count < 1:
            raise ValueError(f"GramShard.count must be the number of entries summed (an int >= 1), got {shard.count!r}")
        if not (math.isfinite(shard.yy) and shard.yy >= 0) or shard.precision not in (torch.float32, torch.float64):
            raise ValueError("GramShard.yy must be a finite sum of squares and precision float32 or float64")
        check.check_finite(G, "GramShard.G")
        check.check_finite(b, "GramShard.b")
        self.shard, self.backend = shard, gfs_kernels.get("torch")
        self.diag = G[torch.arange(n), shard.offset + torch.arange(n)].contiguous()
        dtype = str(shard.precision).removeprefix("torch.")
        self._agree_on("gram", dtype, shard.count, "torch", G.device, float(shard.yy), N=G.shape[1])
        self.facts = dict(
            rows=n, offset=shard.offset, diag_max=float(self.diag.max()), sum_b=float(b.sum()), sum_G=float(G.sum())
        )

    def run(self, comm: Comm, table: list, t0: float) -> Selection:
        rows, N = self._setup(comm, table, t0)
        if N != self.options["N"]:
            raise ValueError(f"the ranks hold {N} rows of G in all, but G has {self.options['N']} columns")
        s, G, b, yy = self.shard, self.shard.G, self.shard.b, float(self.shard.yy)
        diag_max = max(f["diag_max"] for f in table)
        dense = (yy - 2.0 * (sum(f["sum_b"] for f in table) / N) + sum(f["sum_G"] for f in table) / (N * N)) / s.count
        # line_search and refit form products of these sums: statistics far from 1 are multiplied by
        # a power of two for the loop (exact; losses reported unscaled), as gfs.select does
        e = _stats_exponent(torch.tensor([[diag_max]]), yy) if self.step != "uniform" else 0
        diag = self.diag
        if e:
            G, b, diag, yy = _scale.ldexp(G, -e), _scale.ldexp(b, -e), _scale.ldexp(diag, -e), math.ldexp(yy, -e)
        stop_loss = -1.0 if self.eps is None else math.ldexp(dense + self.eps, -e)
        shard = Shard(comm, rows)
        self._loop_starts(comm)
        res = gram.LOOPS[self.step](
            lambda j: G[:, j],  # this rank's part of G[j, :], by symmetry
            diag,
            b,
            yy,
            s.count,
            self.k,
            replacement=self.replacement,
            stop_loss=stop_loss,
            tol=gram.tolerance(s.precision),
            shard=shard,
        )
        rtol = 1e-5 if s.precision == torch.float32 else 1e-10  # (as GramStats.rtol)
        worst = float(_scale.ldexp(res.losses.cpu(), e).min())
        if worst < -rtol * (float(s.yy) + diag_max) / s.count:
            raise ValueError(
                f"the statistics are not positive semi-definite: a loss would be {worst:.6g} < 0; they are corrupted "
                "(a damaged file, or statistics of other candidates merged in); rebuild them"
            )
        res.losses = res.losses.clamp_min(0.0)
        res.notes["gram_loop"] = "the rule's Python loop over torch operations, sharded"
        reason = f"sharded over {comm.world} ranks (Gram engine, rows of G per rank); the rules' torch loops"
        return self._finish(comm, res, e, dense, Plan("gram", self.backend, reason), shard.offset, t0)


def _digest(y: torch.Tensor) -> str:
    """A fingerprint of the target values (-0.0 and 0.0 alike), to check every rank has the same y."""
    y64 = (y.double() + 0.0).cpu().contiguous()
    return hashlib.blake2b(y64.numpy().tobytes(), digest_size=16).hexdigest()

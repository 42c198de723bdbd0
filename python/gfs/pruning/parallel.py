"""Data-parallel calibration for gfs.prune: the ranks of a torch.distributed group each run their
share of the calibration batches, and every rank ends with the same pruned model.

What each rank does alone: the forward passes of both networks over its own batches (and their
activation checkpoints), the layer statistics of its batches, the fold check's outputs on its
images. What the ranks exchange, per channel group (docs/design.md section 7):

- one agreement (gfs.distributed.agree: one all-gather of a few hundred bytes a rank): any error
  a rank met while capturing or building its statistics (raised on every rank, naming the rank),
  the fold checks finished since the last exchange (max |folded - expected| and max |expected|
  on its positions: the maxima over the ranks are the single-process run's), and, for the
  criteria without statistics ("l1", "random"), the sums of the report's losses;
- one all-reduce of the group's GramStats (G, b, the sums, yy, count:
  :meth:`gfs.GramStats.all_reduce`), for criterion "local"; the selection then runs on identical
  statistics on every rank, and is deterministic, so every rank folds the same channels with the
  same scales;
- for a group with squeeze-excitation, one all-reduce of the gates' input sums (their means are
  folded into the gate's bias).

At the start one agreement checks that every rank has the same settings, model weights, channel
groups and input shape (a mismatch raises on every rank, naming the ranks), and gathers the batch
sizes (rank r's images follow rank r-1's in the global order, which the fold check's sampled
positions use). At the end one agreement compares a SHA-256 of every rank's pruned model: a
difference raises on every rank, naming the ranks. A checkpoint is written by rank 0 alone
(atomically) and read by every rank; a failed write is raised on every rank at the next
exchange. Every collective is bounded by ``timeout`` (gfs.distributed.comm): a rank that died
or never joins ends the others with a CollectiveError.

How close to the single-process run on all the batches (in rank order): the statistics are the
same sums taken in another order (each rank's float64 partial sums, then their sum; the float32
products are chunked per rank), so they agree to rounding (about 1e-12 relative in float64, the
float32 products' 1e-6 of sqrt(G_ii G_jj) at worst). The kept channels are the same unless two
candidates' scores tie to within that rounding. With ``step="uniform"`` and no replacement the
scales are exactly N / kept, so the same kept channels give the same pruned model bit for bit;
with "line_search" or "refit" the scales, and so the weights, agree to rounding (step sizes from
float32-product statistics: about 1e-5 relative; tests/test_distributed_prune.py). Reported
losses and fold errors agree to rounding.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist

from ..distributed.agree import agree
from ..distributed.comm import DEFAULT_TIMEOUT, Comm, as_timeout


def ranks_for(group, timeout) -> Ranks | None:
    """The Ranks of a data-parallel gfs.prune call, or None for a single-process run: when
    ``group`` is None and torch.distributed is not initialised, or the group has one rank."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "gfs.prune: group= was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) on every rank first"
        )
    error = None
    try:
        limit = as_timeout(timeout)
    except (TypeError, ValueError) as exc:  # reported on every rank by the first agreement
        limit, error = DEFAULT_TIMEOUT, exc
    comm = Comm(group, limit, name="gfs.prune")
    if comm.world == 1:
        if error is not None:
            raise error
        return None
    return Ranks(comm, error)


class Ranks:
    """This rank's side of a data-parallel gfs.prune run: the collectives, in the order every
    rank makes them (see the module notes)."""

    def __init__(self, comm: Comm, error: BaseException | None = None):
        self.comm = comm
        self.rank, self.world = comm.rank, comm.world
        self.error = error  # an error to report at the next agreement (a bad timeout, a failed write)
        self.exchanged = True  # the current group's exchange is done (none is due before begin())
        self.folds: list = []  # [group index, max |folded - expected|, max |expected|] finished here
        self.offset = 0  # this rank's first sample in the global order
        self.total = 0  # samples on all ranks
        self.sizes: list = []  # samples per rank

    def bounded(self):
        return self.comm.bounded()

    # ---- agreements ----------------------------------------------------------------------

    def setup(self, options: dict, facts: dict, error: BaseException | None) -> list:
        """The first collective: every rank's settings must match (raises on every rank
        otherwise); returns every rank's facts. ``facts["samples"]``: this rank's samples."""
        self.comm.stage = "the set-up"
        table = agree(self.comm, options, facts, error or self._take_error(), "gfs.prune")
        self.sizes = [int(f["samples"]) for f in table]
        self.offset, self.total = sum(self.sizes[: self.rank]), sum(self.sizes)
        return table

    def check(self, options: dict, error: BaseException | None, what: str) -> list:
        """One agreement on ``options`` and errors (e.g. after reading the checkpoint)."""
        return agree(self.comm, options, {}, error or self._take_error(), what)

    def begin(self, name: str) -> None:
        """Group ``name`` starts: its exchange is due."""
        self.exchanged = False
        self.comm.stage = f"group {name!r}"

    def exchange(self, error: BaseException | None = None, sums: list | None = None) -> tuple[dict, list]:
        """The group's agreement: raises on every rank when any rank has an error; else returns
        ({group index: fold error} of the fold checks finished since the last exchange, with
        every rank's positions, and every rank's ``sums`` (a list per rank)."""
        self.exchanged = True
        facts = {"folds": self.folds, "sums": sums}
        self.folds = []
        table = agree(self.comm, {}, facts, error or self._take_error(), f"gfs.prune ({self.comm.stage})")
        return _fold_errors([f["folds"] for f in table]), [f["sums"] for f in table]

    def fail(self, error: BaseException) -> None:
        """This rank raised before the group's exchange: raise it on every rank (the others are
        in the exchange, or reach it)."""
        self.exchange(error)
        raise error  # pragma: no cover - the agreement raises on every rank when one has an error

    def final(self, model) -> dict:
        """The last agreement: the fold checks still to combine, and the pruned models compared
        by SHA-256 (RuntimeError on every rank, naming the ranks whose model differs)."""
        self.comm.stage = "the end"
        mine = _model_digest(model)
        facts = {"folds": self.folds, "model": mine}
        self.folds = []
        table = agree(self.comm, {}, facts, self._take_error(), "gfs.prune (the end)")
        differ = [r for r, f in enumerate(table) if f["model"] != table[0]["model"]]
        if differ:
            raise RuntimeError(
                f"gfs.prune: the pruned models differ between ranks: rank(s) {differ} of {self.world} did not end with "
                f"rank 0's model (SHA-256 {table[0]['model'][:16]}... vs {table[differ[0]]['model'][:16]}...); the "
                f"ranks must pass the same model and settings and run the same gfs and torch (please report this)"
            )
        return _fold_errors([f["folds"] for f in table])

    def _take_error(self):
        error, self.error = self.error, None
        return error

    # ---- reductions ----------------------------------------------------------------------

    def sum_stats(self, stats):
        """Sum the group's GramStats over the ranks, in place (one all-reduce, and one
        all-gather of the duplicate-candidate partition)."""
        n = stats.n
        self.comm.call("the layer statistics", lambda: stats.all_reduce(self.comm.group), 8 * (n * n + 2 * n + 5))
        return stats

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``t`` (float64) over the ranks."""
        out = self.comm.all_reduce(t.double(), dist.ReduceOp.SUM, "a sum over the calibration batches")
        return out.to(t.device)


def _fold_errors(per_rank: list) -> dict:
    """{group index: max error / max |expected|} from every rank's [index, err, scale] lists."""
    err: dict = {}
    for folds in per_rank:
        for index, e, s in folds:
            a, b = err.get(index, (0.0, 0.0))
            err[index] = (max(a, e), max(b, s))
    return {i: e / max(s, 1e-30) for i, (e, s) in err.items()}


def _model_digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def digest(value) -> str:
    """A short SHA-256 of a JSON value (settings too long to agree on in full)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]

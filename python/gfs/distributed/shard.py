"""`Shard`: a block of the candidates in each rank, behind the seam every rule's loops use
(gfs.engines.uniform.Whole), so uniform, line_search and refit run sharded, on both engines,
from their one home.

Global indices follow rank order (rank 0 holds 0 .. n_0 - 1, rank 1 the next n_1, ...). The
loops are replicated: every rank runs the same steps on the same scalars, and these methods are
the only places where ranks exchange anything:

- `best`: each rank's first local minimum (score, global index, the winner's carried entries,
  a value to max-reduce) in one all-gather; every rank then takes the same winner (a NaN first,
  as torch's argmin does, then the smallest score, then the lowest global index: the first
  minimum of the concatenated scores, i.e. the single-process pick);
- `entries` / `row`: the values of candidate j (its entries of some vectors and matrices; its
  row of U, in U's dtype) in one broadcast from the rank that holds it;
- `max`: one all-reduce.
"""

from __future__ import annotations

import bisect
import itertools
import math

import torch
import torch.distributed as dist

from ..engines.uniform import Pick, Whole
from .comm import Comm


class Shard(Whole):
    """This rank's block of candidates: rows[r] of them on rank r (U: this rank's features, for
    the streaming engine)."""

    def __init__(self, comm: Comm, rows: list[int], U: torch.Tensor | None = None):
        super().__init__(sum(rows), U)
        self.comm = comm
        self.starts = list(itertools.accumulate([0, *rows]))  # rank q holds starts[q] .. starts[q+1] - 1
        self.offset, self.size = self.starts[comm.rank], rows[comm.rank]

    def local(self, j: int) -> int | None:
        i = j - self.offset
        return i if 0 <= i < self.size else None

    def owner(self, j: int) -> int:
        return bisect.bisect_right(self.starts, j) - 1

    def best(self, score, *carry, largest=False, also_max=None) -> Pick:
        i = int(torch.argmax(score) if largest else torch.argmin(score))
        s = float(score[i])
        mine = [-s if largest else s, float(self.offset + i), -math.inf if also_max is None else also_max]
        table = self.comm.all_gather(
            torch.tensor(mine + [float(x[i]) for x in carry], dtype=torch.float64), "the pick"
        ).tolist()
        w = min(range(len(table)), key=lambda q: _order(table[q]))
        j = int(table[w][1])
        top = None if also_max is None else float(torch.tensor([row[2] for row in table], dtype=torch.float64).max())
        return Pick(j, self.local(j), table[w][3:], top)

    def entries(self, j: int, *xs: torch.Tensor) -> list:
        widths = [math.prod(x.shape[1:]) for x in xs]
        i, device = self.local(j), self.comm.device
        if i is not None:
            buf = torch.cat([x[i].reshape(-1).double().to(device) for x in xs])
        else:
            buf = torch.empty(sum(widths), dtype=torch.float64, device=device)
        if buf.numel():
            buf = self.comm.broadcast(buf, self.owner(j), "a candidate's values")
        out, at = [], 0
        for x, width in zip(xs, widths, strict=True):
            part = buf[at : at + width]
            out.append(float(part) if x.dim() == 1 else part.reshape(x.shape[1:]).to(x.device))
            at += width
        return out

    def row(self, j: int) -> torch.Tensor:
        """u_j in float64, sent as the bytes of U's own dtype (exact, and half of float64's for float32)."""
        assert self.U is not None, "a Shard without features has no rows"
        i, U = self.local(j), self.U
        mine = U[i] if i is not None else torch.empty(U.shape[1], dtype=U.dtype, device=U.device)
        raw = self.comm.broadcast(mine.contiguous().view(torch.uint8), self.owner(j), "a row of U")
        return raw.view(U.dtype).to(U.device).double()

    def max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        return float(self.comm.all_reduce(t, dist.ReduceOp.MAX, "a max"))


def _order(row: list) -> tuple:
    """Sort key of one rank's candidate for the pick: NaN first, then the key, then the index."""
    key = row[0]
    return (not math.isnan(key), 0.0 if math.isnan(key) else key, row[1])

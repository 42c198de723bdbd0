"""The uniform rule (the papers' Algorithm 1), its one home.

    z_0 = 0;  step t:  j = argmin_j ||y - (t z_t + u_j) / (t + 1)||^2,  z_{t+1} = (t z_t + u_j) / (t + 1)

With r = y - z_t and a_j = ||u_j||^2 - 2 <y, u_j>, the step-t loss of candidate j is
(||q||^2 + a_j - 2 t <r, u_j>) / (t+1)^2 for a q that does not depend on j, so the pick is
argmin_j a_j - 2 t e_j with e = U r (docs/design.md section 2); ties go to the lowest index. The weights
are counts / steps.

Two loops, the readable statement of the rule that the native kernels follow step for step
(csrc/cpu/greedy_cpu.cpp, csrc/cuda, the Triton loops; csrc/cpu/gram_cpu.cpp for the Gram form):
- `stream_loop`: from a backend's streaming primitives (one `dots` pass over U per step);
- `gram_loop`: from the statistics, one row of G per step.

Every rule's loops (here, line_search, refit) see the candidates through `Whole` (all of them in
this process, the default). gfs.distributed passes a `Shard` instead (a block of candidates per
process: the pick agreed over all of them, rows and entries sent by the process that holds
them), and the same loops run sharded (docs/design.md section 7).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from gfs_kernels.base import Backend, LoopResult, uniform_weights

Rows = Callable[[int], torch.Tensor]


class Pick(NamedTuple):
    """The winner of a step: its global index `j`, its index in this process's block (`local`;
    None where another process holds it), its entries of the vectors carried with the pick
    (`values`), and the max of `also_max` over all processes (`max`; None when not asked)."""

    j: int
    local: int | None
    values: list[float]
    max: float | None


class Whole:
    """All N candidates in this process: the seam through which every rule's loop sees the
    candidates (the default of every loop). gfs.distributed.Shard overrides each method with
    collectives, so the same loops run with the candidates split across processes: the pick
    (ties to the lowest global index), a candidate's entries and its row of U, a max."""

    def __init__(self, n: int, U: torch.Tensor | None = None):
        self.n, self.U = n, U  # n: candidates in all (global indices are 0 .. n - 1)

    def local(self, j: int) -> int | None:
        """Candidate j's index in this process's block, None where another process holds it."""
        return j

    def best(
        self, score: torch.Tensor, *carry: torch.Tensor, largest: bool = False, also_max: float | None = None
    ) -> Pick:
        """The first minimum of score (first maximum when `largest`: ties to the lowest index),
        with the winner's entries of the vectors `carry` and `also_max`'s max."""
        j = int(torch.argmax(score) if largest else torch.argmin(score))
        return Pick(j, j, [float(x[j]) for x in carry], also_max)

    def entries(self, j: int, *xs: torch.Tensor) -> list:
        """Candidate j's entries of xs (candidates along dim 0): a float of a vector, a float64
        tensor of a matrix (its row j)."""
        return [float(x[j]) if x.dim() == 1 else x[j].double() for x in xs]

    def row(self, j: int) -> torch.Tensor:
        """u_j, candidate j's features, in float64 (the streaming engine)."""
        assert self.U is not None, "a Whole without features has no rows"
        return self.U[j].double()

    def max(self, value: float) -> float:
        """The max of `value` over the processes."""
        return value


def stream_loop(
    backend: Backend,
    U: torch.Tensor,
    y: torch.Tensor,
    k: int,
    replacement: bool,
    stop_loss: float,
    shard: Whole | None = None,
) -> LoopResult:
    """The uniform rule driven from Python over `backend.prepare` / `backend.dots`. z and r are
    kept in float64; the reported loss is the exact ||r_{t+1}||^2 / M. `shard` (default: all of
    U in this process) picks the winner, gives its row and reduces the gap's max."""
    shard = shard or Whole(U.shape[0], U)
    M = U.shape[1]
    acc = y.dtype
    norms, b = backend.prepare(U, y)
    a = norms.double() - 2.0 * b.double()
    y64 = y.double()
    z = torch.zeros_like(y64)
    r = y64.clone()
    e = b
    taken = torch.zeros(U.shape[0], dtype=torch.bool, device=U.device)
    picks, losses, gaps = [], [], []
    for t in range(k):
        e_max = None
        if t > 0:
            e = backend.dots(U, r.to(acc))
            e_max = float(e.double().max())
        score = a - (2.0 * t) * e.double()
        if not replacement:
            score = score.masked_fill(taken, float("inf"))
        p = shard.best(score, also_max=e_max)
        if p.max is not None:
            gaps.append(gap(p.max, r, z, M))
        if p.local is not None:
            taken[p.local] = True
        z = (t * z + shard.row(p.j).to(z.device)) / (t + 1)
        r = y64 - z
        loss = float(r @ r) / M
        picks.append(p.j)
        losses.append(loss)
        if loss <= stop_loss:
            break
    gaps.append(gap(shard.max(float(backend.dots(U, r.to(acc)).double().max())), r, z, M))
    dev = U.device
    return LoopResult.uniform(
        torch.tensor(picks, dtype=torch.int64, device=dev),
        torch.tensor(losses, dtype=torch.float64, device=dev),
        torch.tensor(gaps, dtype=torch.float64, device=dev),
        shard.n,
    )


def gap(e_max: float, r: torch.Tensor, z: torch.Tensor, M: int) -> float:
    """Frank-Wolfe gap max_j <2 r, u_j - z> / M from max_j e_j, e = U r (r = y - z)."""
    return 2.0 * (e_max - float(r @ z)) / M


def gram_loop(
    rows: Rows, diag, b, yy, count, k, *, replacement=True, stop_loss=-1.0, tol=0.0, shard: Whole | None = None
) -> LoopResult:
    """The uniform rule from the statistics: ct = G counts; the step-t score of j is
    G_jj - 2 (t+1) b_j + 2 ct_j (the same argmin as above, scaled by (t+1)^2). With a `shard`,
    diag, b and rows(j) are this process's block of the candidates (rows(j): its part of G[j, :])."""
    shard = shard or Whole(b.shape[0])
    M = float(count)
    ct = torch.zeros_like(b)
    taken = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
    Q = B = 0.0
    picks, losses, gaps, gammas = [], [], [], []
    for t in range(k):
        score = diag - (2.0 * (t + 1)) * b + 2.0 * ct
        if not replacement:
            score = score.masked_fill(taken, math.inf)
        p = shard.best(score, ct, diag, b)
        ct_j, diag_j, b_j = p.values
        if p.local is not None:
            taken[p.local] = True
        n = t + 1.0
        Q += 2.0 * ct_j + diag_j
        B += b_j
        ct += rows(p.j)
        zb, zz = B / n, Q / (n * n)
        picks.append(p.j)
        losses.append((yy - 2.0 * zb + zz) / M)
        gaps.append(2.0 * (shard.max(float((b - ct / n).max())) - (zb - zz)) / M)
        gammas.append(1.0 / n)
        if losses[-1] <= stop_loss:
            break
    idx = torch.tensor(picks, dtype=torch.int64, device=b.device)
    return pack(picks, losses, gaps, gammas, uniform_weights(idx, shard.n), b.device)


def pack(picks, losses, gaps, gammas, w, device) -> LoopResult:
    """A LoopResult from the Python lists of a loop."""
    f64 = dict(dtype=torch.float64, device=device)
    return LoopResult(
        torch.tensor(picks, dtype=torch.int64, device=device),
        torch.tensor(losses, **f64),
        torch.tensor(gaps, **f64),
        torch.tensor(gammas, **f64),
        w,
    )

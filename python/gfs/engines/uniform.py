"""The uniform rule (the papers' Algorithm 1), its one home.

    z_0 = 0;  step t:  j = argmin_j ||y - (t z_t + u_j) / (t + 1)||^2,  z_{t+1} = (t z_t + u_j) / (t + 1)

With r = y - z_t and a_j = ||u_j||^2 - 2 <y, u_j>, the step-t loss of candidate j is
(||q||^2 + a_j - 2 t <r, u_j>) / (t+1)^2 for a q that does not depend on j, so the pick is
argmin_j a_j - 2 t e_j with e = U r (DESIGN section 2); ties go to the lowest index. The weights
are counts / steps.

Two loops, the readable statement of the rule that the native kernels follow step for step
(csrc/cpu/greedy_cpu.cpp, csrc/cuda, the Triton loops; csrc/cpu/gram_cpu.cpp for the Gram form):
- `stream_loop`: from a backend's streaming primitives (one `dots` pass over U per step), also
  sharded across processes (gfs.distributed passes a `Shard` that agrees on each pick);
- `gram_loop`: from the statistics, one row of G per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from gfs_kernels.base import Backend, LoopResult, uniform_weights

Rows = Callable[[int], torch.Tensor]


class Whole:
    """The candidates of one process: the pick is the local argmin (first minimum: ties to the
    lowest index), its row is U[j]."""

    def __init__(self, U: torch.Tensor):
        self.U, self.n = U, U.shape[0]

    def best(self, score: torch.Tensor) -> tuple[int, int | None, torch.Tensor]:
        """(global index, local index or None, the pick's row in float64)."""
        j = int(torch.argmin(score))
        return j, j, self.U[j].double()

    def max(self, value: float) -> float:
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
    U in this process) picks the winner and reduces the gap's max."""
    shard = shard or Whole(U)
    N, M = U.shape
    acc = y.dtype
    norms, b = backend.prepare(U, y)
    a = norms.double() - 2.0 * b.double()
    y64 = y.double()
    z = torch.zeros_like(y64)
    r = y64.clone()
    e = b
    taken = torch.zeros(N, dtype=torch.bool, device=U.device)
    picks, losses, gaps = [], [], []
    for t in range(k):
        if t > 0:
            e = backend.dots(U, r.to(acc))
            gaps.append(gap(shard.max(float(e.double().max())), r, z, M))
        score = a - (2.0 * t) * e.double()
        if not replacement:
            score = score.masked_fill(taken, float("inf"))
        j, local, u = shard.best(score)
        if local is not None:
            taken[local] = True
        z = (t * z + u.to(z.device)) / (t + 1)
        r = y64 - z
        loss = float(r @ r) / M
        picks.append(j)
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


def gram_loop(rows: Rows, diag, b, yy, count, k, *, replacement=True, stop_loss=-1.0, tol=0.0) -> LoopResult:
    """The uniform rule from the statistics: ct = G counts; the step-t score of j is
    G_jj - 2 (t+1) b_j + 2 ct_j (the same argmin as above, scaled by (t+1)^2)."""
    N, M = b.shape[0], float(count)
    ct = torch.zeros_like(b)
    taken = torch.zeros(N, dtype=torch.bool, device=b.device)
    Q = B = 0.0
    picks, losses, gaps, gammas = [], [], [], []
    for t in range(k):
        score = diag - (2.0 * (t + 1)) * b + 2.0 * ct
        if not replacement:
            score = score.masked_fill(taken, math.inf)
        j = int(torch.argmin(score))
        taken[j] = True
        n = t + 1.0
        Q += 2.0 * float(ct[j]) + float(diag[j])
        B += float(b[j])
        ct += rows(j)
        zb, zz = B / n, Q / (n * n)
        picks.append(j)
        losses.append((yy - 2.0 * zb + zz) / M)
        gaps.append(2.0 * (float((b - ct / n).max()) - (zb - zz)) / M)
        gammas.append(1.0 / n)
        if losses[-1] <= stop_loss:
            break
    idx = torch.tensor(picks, dtype=torch.int64, device=b.device)
    return pack(picks, losses, gaps, gammas, uniform_weights(idx, N), b.device)


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

"""The refit rule (fully corrective, like orthogonal matching pursuit), its one home.

After each addition the chosen set's weights are re-fit by *affine* least squares:
min ||y - sum_{j in S} w_j u_j||^2 subject to sum w_j = 1 (weights sum to 1 like the other rules,
any sign), through an incrementally built Cholesky factor. A step adds the candidate whose
addition lowers this refit loss most (step 0: the single best candidate). A candidate whose
direction is degenerate (a duplicate, or already spanned) lowers nothing; if it is picked anyway
the fit is unchanged (gamma 0).

`gram_loop` needs one row of G per addition: the Gram engine reads it, `stream_loop` computes it
as G[j, :] = U u_j with one `dots` pass (and rebuilds z from the weights for the exact loss).
csrc/cpu/gram_cpu.cpp follows `RefitState` and `gram_loop`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from gfs_kernels.base import Backend, LoopResult

from .uniform import Rows, Whole, pack


class RefitState:
    """Affine least squares over a growing set, through an incrementally built Cholesky factor
    (see csrc/cpu/gram_cpu.cpp): directions d_i = u_{s_i} - u_{s0}, their Gram H = L L^T, and
    every candidate's projections P[q, j] = <q_q, u_j - u_s0> on the orthonormal directions.
    With a `shard`, the vectors (and P's columns) cover this process's block of candidates; L,
    t and the members are the same in every process."""

    def __init__(self, diag, b, yy, g0, s0, tol, shard: Whole | None = None):
        self.shard = shard or Whole(b.shape[0])
        g00, b0 = self.shard.entries(s0, g0, b)  # G[s0, s0] and b[s0], from the process holding s0
        self.s0, self.g0, self.g00, self.tol = s0, g0, g00, tol
        self.kappa = (b - g0) - (b0 - self.g00)  # <y - u_s0, u_j - u_s0>
        self.nu = (diag - g0) - (g0 - self.g00)  # ||u_j - u_s0||^2
        self.sigma = torch.zeros_like(b)  # sum_q t_q P[q, j]
        self.pi = torch.zeros_like(b)  # sum_q P[q, j]^2
        self.members = [s0]
        self.inset = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
        mark(self.inset, self.shard, s0)
        self.P = torch.empty(0, b.shape[0], dtype=torch.float64, device=b.device)  # rows: directions
        self.L = torch.zeros(0, 0, dtype=torch.float64)
        self.t: list[float] = []
        self.loss_abs = yy - 2.0 * b0 + self.g00

    def scores(self):
        """(rho, ok, num): the loss decrease of adding each candidate, whether its direction is
        usable, and num = <y - z, u_j - z> (for the gap)."""
        num = self.kappa - self.sigma
        den = self.nu - self.pi
        ok = (~self.inset) & (self.nu > 0) & (den > self.tol * self.nu)
        rho = torch.where(ok, num * num / torch.where(ok, den, 1.0), 0.0)
        return rho, ok, num

    def add(self, j: int, gj: torch.Tensor) -> None:
        """Add candidate j (usable), given its row of G: one new row of L, one new row of P."""
        m = len(self.t)
        kappa_j, sigma_j, nu_j, pi_j, Pj = self.shard.entries(j, self.kappa, self.sigma, self.nu, self.pi, self.P[:m].T)
        num = kappa_j - sigma_j
        Ljj = math.sqrt(nu_j - pi_j)
        g = (gj - self.g0) - (self.shard.entries(self.s0, gj)[0] - self.g00)  # <u_j - u_s0, u_i - u_s0> for every i
        if m:
            row = Pj.clone()  # the new row of L: j's projections on the directions so far
            g = g - row @ self.P[:m]
        else:
            row = torch.zeros(0, dtype=torch.float64, device=g.device)
        p = g / Ljj
        mark(p, self.shard, self.s0, 0.0)
        tnew = num / Ljj
        self.sigma += tnew * p
        self.pi += p * p
        if self.P.shape[0] == m:  # grow the projection store geometrically
            grown = torch.empty(max(4, 2 * m), p.shape[0], dtype=torch.float64, device=p.device)
            grown[:m] = self.P[:m]
            self.P = grown
        self.P[m] = p
        L = torch.zeros(m + 1, m + 1, dtype=torch.float64)
        L[:m, :m] = self.L
        L[m, :m] = row.cpu()
        L[m, m] = Ljj
        self.L = L
        self.t.append(tnew)
        self.members.append(j)
        mark(self.inset, self.shard, j)
        self.loss_abs -= tnew * tnew

    def weights(self, n, device) -> torch.Tensor:
        w = torch.zeros(n, dtype=torch.float64)
        if self.t:
            beta = torch.linalg.solve_triangular(
                self.L.T, torch.tensor(self.t, dtype=torch.float64)[:, None], upper=True
            )[:, 0]
            w[self.members[1:]] = beta
            w[self.s0] = 1.0 - float(beta.sum())
        else:
            w[self.s0] = 1.0
        return w.to(device)


def mark(x: torch.Tensor, shard: Whole, j: int, value=True) -> None:
    """x[j] = value where this process holds candidate j."""
    local = shard.local(j)
    if local is not None:
        x[local] = value


def gram_loop(
    rows: Rows,
    diag,
    b,
    yy,
    count,
    k,
    *,
    replacement=True,
    stop_loss=-1.0,
    tol=1e-9,
    exact_loss: Callable[[RefitState], float] | None = None,
    shard: Whole | None = None,
) -> LoopResult:
    """Refit: after each addition the chosen set's weights are re-fit by affine least squares
    (weights sum to 1, any sign). A step adds the candidate whose addition lowers the refit loss
    most (step 0: the single best candidate). `exact_loss(state)`, when given, replaces the loss
    from the statistics (the streaming engine passes ||y - z||^2 / M from the rebuilt z). With a
    `shard`, diag, b and rows(j) are this process's block of the candidates."""
    shard = shard or Whole(b.shape[0])
    M = float(count)
    s0 = shard.best(diag - 2.0 * b).j
    st = RefitState(diag, b, yy, rows(s0), s0, tol, shard)
    loss_of = exact_loss or (lambda s: s.loss_abs / M)
    picked = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
    mark(picked, shard, s0)
    _, _, num = st.scores()
    picks, losses, gaps, gammas = [s0], [loss_of(st)], [2.0 * shard.max(float(num.max())) / M], [1.0]
    for _t in range(1, k if losses[0] > stop_loss else 1):
        rho, ok, _ = st.scores()
        if not replacement:
            rho = rho.masked_fill(picked, -math.inf)
        p = shard.best(rho, ok, largest=True)  # first maximum: ties to the lowest index
        mark(picked, shard, p.j)
        gamma = 0.0
        if p.values[0]:  # ok[j]: j's direction is usable
            st.add(p.j, rows(p.j))
            gamma = 1.0
        _, _, num = st.scores()
        picks.append(p.j)
        losses.append(loss_of(st) if gamma else losses[-1])
        gaps.append(2.0 * shard.max(float(num.max())) / M)
        gammas.append(gamma)
        if losses[-1] <= stop_loss:
            break
    return pack(picks, losses, gaps, gammas, st.weights(shard.n, b.device), b.device)


def stream_loop(backend: Backend, U, y, k, replacement, stop_loss, tol, shard: Whole | None = None) -> LoopResult:
    shard = shard or Whole(U.shape[0], U)
    M = U.shape[1]
    acc = y.dtype
    norms, b = backend.prepare(U, y)
    y64 = y.double()
    fetched: dict[int, torch.Tensor] = {}  # u_j of every j whose row of G was computed: the chosen set

    def rows(j: int) -> torch.Tensor:  # G[j, :] = U u_j, one pass over U
        fetched[j] = shard.row(j).to(U.device)
        return backend.dots(U, fetched[j].to(acc)).double()

    def exact_loss(st: RefitState) -> float:  # ||y - z||^2 / M, z = sum_j w_j u_j rebuilt (O(M |set|))
        members = torch.tensor(st.members, device=U.device)
        z = st.weights(shard.n, U.device)[members] @ torch.stack([fetched[j] for j in st.members])
        r = y64 - z
        return float(r @ r) / M

    return gram_loop(
        rows,
        norms.double(),
        b.double(),
        float(y64 @ y64),
        M,
        k,
        replacement=replacement,
        stop_loss=stop_loss,
        tol=tol,
        exact_loss=exact_loss,
        shard=shard,
    )

"""The line-search rule ("greedy optimization", NeurIPS 2020), its one home.

    z <- z + gamma (u_j - z),  (j, gamma) the joint minimiser of ||y - z||^2, gamma in [0, 1]

in closed form: with rd = <y - z, u_j - z> and dd = ||u_j - z||^2, gamma_j = clip(rd / dd, 0, 1)
and the loss decreases by gamma (2 rd - gamma dd). Step 0 takes the single best candidate with
gamma = 1. The weights follow w <- (1 - gamma) w + gamma e_j; the loss never increases.

Both loops keep c_j = <z, u_j>, zz = ||z||^2 and zb = <z, y>: `stream_loop` gets c = b - U r
from one `dots` pass per step (z itself kept in float64 for the exact loss), `gram_loop` updates
c from one row of G. csrc/cpu/gram_cpu.cpp follows `gram_loop`.
"""

from __future__ import annotations

import math

import torch

from gfs_kernels.base import Backend, LoopResult

from .uniform import Pick, Rows, Whole, gap, pack


def scores(diag, b, c, zb, zz, tol):
    """(rho, gamma, rd) for every candidate: rd = <y - z, u_j - z>, dd = ||u_j - z||^2,
    gamma = clip(rd / dd, 0, 1) (0 if rd or dd is at rounding level), rho = the loss decrease."""
    rd = (b - c) - (zb - zz)
    dd = diag - 2.0 * c + zz
    # rd and dd must exceed the rounding level of their own computation (else no move: gamma = 0,
    # so that candidates that cannot help tie exactly and the lowest index wins)
    ok = (rd > tol * (b.abs() + c.abs() + (abs(zb) + abs(zz)))) & (dd > tol * (diag + zz))
    gamma = torch.where(ok, torch.clamp(rd / torch.where(ok, dd, 1.0), max=1.0), 0.0)
    rho = torch.where(ok, gamma * (2.0 * rd - gamma * dd), 0.0)
    return rho, gamma, rd


def weights(picks, gammas, n, device) -> torch.Tensor:
    """w = sum_t gamma_t prod_{s > t} (1 - gamma_s) e_{j_t}: the weights after w <- (1-g) w + g e_j."""
    w = torch.zeros(n, dtype=torch.float64)
    scale = 1.0
    for j, g in zip(reversed(picks), reversed(gammas), strict=True):
        if scale == 0.0:
            break
        w[j] += scale * g
        scale *= 1.0 - g
    return w.to(device)


def _pick(t, diag, b, c, zb, zz, tol, taken, replacement, shard: Whole, *carry, also_max=None) -> tuple[Pick, float]:
    """(pick, gamma) of step t: the best single candidate at step 0, the best line search after;
    the pick carries the winner's entries of `carry` (and, after step 0, its gamma last)."""
    if t == 0:
        return shard.best(diag - 2.0 * b, *carry, also_max=also_max), 1.0
    rho, gam, _ = scores(diag, b, c, zb, zz, tol)
    if not replacement:
        rho = rho.masked_fill(taken, -math.inf)
    p = shard.best(rho, *carry, gam, largest=True, also_max=also_max)  # first maximum: ties to the lowest index
    return p, p.values[-1]


def stream_loop(backend: Backend, U, y, k, replacement, stop_loss, tol, shard: Whole | None = None) -> LoopResult:
    shard = shard or Whole(U.shape[0], U)
    M = U.shape[1]
    acc = y.dtype
    norms, b = backend.prepare(U, y)
    norms, b = norms.double(), b.double()
    y64 = y.double()
    z = torch.zeros_like(y64)
    r = y64.clone()
    zz = zb = 0.0
    c = torch.zeros_like(b)
    taken = torch.zeros(U.shape[0], dtype=torch.bool, device=U.device)
    picks, losses, gaps, gammas = [], [], [], []
    for t in range(k):
        e_max = None
        if t > 0:
            e = backend.dots(U, r.to(acc)).double()
            e_max = float(e.max())
            c = b - e
        p, gamma = _pick(t, norms, b, c, zb, zz, tol, taken, replacement, shard, also_max=e_max)
        if p.max is not None:
            gaps.append(gap(p.max, r, z, M))
        if p.local is not None:
            taken[p.local] = True
        if gamma > 0:
            z = z + gamma * (shard.row(p.j).to(z.device) - z)
            r = y64 - z
        zz, zb = float(z @ z), float(z @ y64)
        picks.append(p.j)
        losses.append(float(r @ r) / M)
        gammas.append(gamma)
        if losses[-1] <= stop_loss:
            break
    gaps.append(gap(shard.max(float(backend.dots(U, r.to(acc)).double().max())), r, z, M))
    return pack(picks, losses, gaps, gammas, weights(picks, gammas, shard.n, U.device), U.device)


def gram_loop(
    rows: Rows, diag, b, yy, count, k, *, replacement=True, stop_loss=-1.0, tol=1e-9, shard: Whole | None = None
) -> LoopResult:
    """From the statistics: c = G w, zz = ||z||^2, zb = <z, y> updated from one row of G a step
    (with a `shard`: this process's block of diag, b and of each row)."""
    shard = shard or Whole(b.shape[0])
    M = float(count)
    c = torch.zeros_like(b)
    zz = zb = 0.0
    taken = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
    picks, losses, gaps, gammas = [], [], [], []
    for t in range(k):
        p, gamma = _pick(t, diag, b, c, zb, zz, tol, taken, replacement, shard, c, diag, b)
        c_j, diag_j, b_j = p.values[:3]
        if p.local is not None:
            taken[p.local] = True
        h = 1.0 - gamma
        zz = h * h * zz + 2.0 * gamma * h * c_j + gamma * gamma * diag_j
        zb = h * zb + gamma * b_j
        if gamma > 0:
            c = h * c + gamma * rows(p.j)
        picks.append(p.j)
        losses.append((yy - 2.0 * zb + zz) / M)
        gaps.append(2.0 * shard.max(float(((b - c) - (zb - zz)).max())) / M)
        gammas.append(gamma)
        if losses[-1] <= stop_loss:
            break
    return pack(picks, losses, gaps, gammas, weights(picks, gammas, shard.n, b.device), b.device)

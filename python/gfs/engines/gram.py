"""The Gram engine: greedy forward selection from sufficient statistics.

The data enter only through G = U U^T, b = U y, ||y||^2 and the count M (gfs.GramStats); a step
reads at most one row of G and does O(N) work (refit: O(N |set|) for its projections). Three
implementations of the same loop, chosen per device:

- "cpu": the whole k-step loop in one native call, `torch.ops.gfs.gram_greedy`
  (csrc/cpu/gram_cpu.cpp), every step rule;
- "triton": one persistent Triton program on a GPU (src/gfs_kernels/triton_gram.py), uniform rule;
- "torch": the loops below, written with torch operations on N-vectors (any device). They are
  the readable statement of the algorithms (the C++ follows them line by line), and the streaming
  engine reuses `refit_rows` with rows of G computed by one pass over U.

Every loop works in float64, ties go to the lowest index, and the semantics are those of
csrc/cpu/gram_cpu.cpp's header.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

import gfs_kernels
from gfs_kernels import _ops


@dataclass
class GramResult:
    indices: torch.Tensor  # int64 (s,)
    losses: torch.Tensor  # float64 (s,), unclamped
    gaps: torch.Tensor  # float64 (s,)
    gammas: torch.Tensor  # float64 (s,)
    weights: torch.Tensor  # float64 (N,)
    notes: dict = field(default_factory=dict)


def tolerance(precision: torch.dtype) -> float:
    """Relative pivot tolerance for degenerate directions, from the rounding level of the data."""
    return 1e-9 if precision == torch.float64 else 1e-4


# -- backends of the Gram engine --------------------------------------------------------------
PREFERENCE = {"cpu": ["cpu", "torch"], "cuda": ["triton", "torch"]}


def availability(device: torch.device, step: str) -> dict[str, str | None]:
    """For each Gram backend: None if it can run `step` on `device`, else why not."""
    out: dict[str, str | None] = {}
    if device.type != "cpu":
        out["cpu"] = f"runs on cpu, not {device.type}"
    elif not _ops.has_gram_kernel("CPU"):
        out["cpu"] = _ops.load_error or "the extension was built without csrc/cpu/gram_cpu.cpp"
    else:
        out["cpu"] = None
    if device.type != "cuda":
        out["triton"] = f"runs on cuda, not {device.type}"
    elif step != "uniform":
        out["triton"] = f"has the uniform rule only, not {step!r}"
    else:
        from gfs_kernels import triton_gram

        out["triton"] = triton_gram.unavailable_reason()
    out["torch"] = None
    return out


def choose(device: torch.device, step: str, backend: str = "auto") -> tuple[str, str]:
    """(backend name, reason) for the Gram engine."""
    avail = availability(device, step)
    if backend != "auto":
        if backend not in avail:
            raise ValueError(
                f"the Gram engine has no backend {backend!r}; choose one of {['auto', *avail]} "
                f"(or engine='stream' to use the streaming backend {backend!r})"
            )
        if avail[backend]:
            raise ValueError(f"Gram backend {backend!r} cannot run here: {avail[backend]}; use backend='auto'")
        return backend, "requested"
    skipped = []
    for name in PREFERENCE.get(device.type, ["torch"]):
        if avail.get(name) is None:
            reason = f"{name} is the fastest usable Gram backend for {device.type}/{step}"
            return name, reason + (" (skipped " + "; ".join(skipped) + ")" if skipped else "")
        skipped.append(f"{name}: {avail[name]}")
    return "torch", "torch (skipped " + "; ".join(skipped) + ")"


def run(G: torch.Tensor, b: torch.Tensor, yy: float, count: int, k: int, *, step: str, replacement: bool,
        stop_loss: float, tol: float, backend: str) -> GramResult:
    """Run `step` for at most k steps from (G, b, yy, count) with the named Gram backend."""
    if backend == "cpu":
        out = torch.ops.gfs.gram_greedy(G, b, float(yy), int(count), int(k), step, bool(replacement),
                                        float(stop_loss), float(tol))
        return GramResult(*out, notes={"gram_loop": "native C++, one call"})
    if backend == "triton":
        from gfs_kernels import triton_gram

        idx, losses, gaps = triton_gram.gram_uniform(G, b, yy, count, k, replacement, stop_loss)
        s = idx.numel()
        gammas = 1.0 / torch.arange(1, s + 1, dtype=torch.float64, device=G.device)
        counts = torch.bincount(idx, minlength=G.shape[0]).double()
        return GramResult(idx, losses, gaps, gammas, counts / s, notes={"gram_loop": "one persistent Triton program"})
    rows = lambda j: G[j]  # noqa: E731
    diag = torch.diagonal(G).contiguous()
    loop = {"uniform": uniform_rows, "line_search": line_search_rows, "refit": refit_rows}[step]
    res = loop(rows, diag, b, yy, count, k, replacement=replacement, stop_loss=stop_loss, tol=tol)
    res.notes["gram_loop"] = "Python loop over torch operations"
    return res


# -- the loops, in torch (the readable twin of csrc/cpu/gram_cpu.cpp) ---------------------------
Rows = Callable[[int], torch.Tensor]


def _pack(picks, losses, gaps, gammas, w, device) -> GramResult:
    f64 = dict(dtype=torch.float64, device=device)
    return GramResult(
        torch.tensor(picks, dtype=torch.int64, device=device),
        torch.tensor(losses, **f64),
        torch.tensor(gaps, **f64),
        torch.tensor(gammas, **f64),
        w,
    )


def uniform_rows(rows: Rows, diag, b, yy, count, k, *, replacement=True, stop_loss=-1.0, tol=0.0) -> GramResult:
    """Uniform rule. ct = G counts; the step-t score of j is G_jj - 2 (t+1) b_j + 2 ct_j."""
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
    w = torch.bincount(torch.tensor(picks, device=b.device), minlength=N).double() / len(picks)
    return _pack(picks, losses, gaps, gammas, w, b.device)


def line_search_scores(diag, b, c, zb, zz, tol):
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


def line_search_rows(rows: Rows, diag, b, yy, count, k, *, replacement=True, stop_loss=-1.0, tol=1e-9) -> GramResult:
    """Line search: z <- z + gamma (u_j - z), (j, gamma) the joint minimiser, gamma in [0, 1];
    step 0 takes the single best candidate with gamma = 1. c = G w, zz = ||z||^2, zb = <z, y>."""
    N, M = b.shape[0], float(count)
    c = torch.zeros_like(b)
    zz = zb = 0.0
    taken = torch.zeros(N, dtype=torch.bool, device=b.device)
    picks, losses, gaps, gammas = [], [], [], []
    for t in range(k):
        if t == 0:
            j, gamma = int(torch.argmin(diag - 2.0 * b)), 1.0
        else:
            rho, gam, _ = line_search_scores(diag, b, c, zb, zz, tol)
            if not replacement:
                rho = rho.masked_fill(taken, -math.inf)
            j = int(torch.argmax(rho))  # first maximum: ties to the lowest index
            gamma = float(gam[j])
        taken[j] = True
        h = 1.0 - gamma
        zz = h * h * zz + 2.0 * gamma * h * float(c[j]) + gamma * gamma * float(diag[j])
        zb = h * zb + gamma * float(b[j])
        if gamma > 0:
            c = h * c + gamma * rows(j)
        picks.append(j)
        losses.append((yy - 2.0 * zb + zz) / M)
        gaps.append(2.0 * float(((b - c) - (zb - zz)).max()) / M)
        gammas.append(gamma)
        if losses[-1] <= stop_loss:
            break
    return _pack(picks, losses, gaps, gammas, line_search_weights(picks, gammas, N, b.device), b.device)


def line_search_weights(picks, gammas, n, device) -> torch.Tensor:
    """w = sum_t gamma_t prod_{s > t} (1 - gamma_s) e_{j_t}: the weights after w <- (1-g) w + g e_j."""
    w = torch.zeros(n, dtype=torch.float64)
    scale = 1.0
    for j, g in zip(reversed(picks), reversed(gammas)):
        if scale == 0.0:
            break
        w[j] += scale * g
        scale *= 1.0 - g
    return w.to(device)


class RefitState:
    """Affine least squares over a growing set, through an incrementally built Cholesky factor
    (see csrc/cpu/gram_cpu.cpp): directions d_i = u_{s_i} - u_{s0}, their Gram H = L L^T, and
    every candidate's projections P[q, j] = <q_q, u_j - u_s0> on the orthonormal directions."""

    def __init__(self, diag, b, yy, g0, s0, tol):
        self.s0, self.g0, self.g00, self.tol = s0, g0, float(g0[s0]), tol
        self.kappa = (b - g0) - (float(b[s0]) - self.g00)  # <y - u_s0, u_j - u_s0>
        self.nu = (diag - g0) - (g0 - self.g00)  # ||u_j - u_s0||^2
        self.sigma = torch.zeros_like(b)  # sum_q t_q P[q, j]
        self.pi = torch.zeros_like(b)  # sum_q P[q, j]^2
        self.members = [s0]
        self.inset = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
        self.inset[s0] = True
        self.P = torch.empty(0, b.shape[0], dtype=torch.float64, device=b.device)  # rows: directions
        self.L = torch.zeros(0, 0, dtype=torch.float64)
        self.t: list[float] = []
        self.loss_abs = yy - 2.0 * float(b[s0]) + self.g00

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
        num = float(self.kappa[j] - self.sigma[j])
        Ljj = math.sqrt(float(self.nu[j] - self.pi[j]))
        m = len(self.t)
        g = (gj - self.g0) - (float(gj[self.s0]) - self.g00)  # <u_j - u_s0, u_i - u_s0> for every i
        if m:
            l = self.P[:m, j].clone()  # the new row of L: j's projections on the directions so far
            g = g - l @ self.P[:m]
        else:
            l = torch.zeros(0, dtype=torch.float64, device=g.device)
        p = g / Ljj
        p[self.s0] = 0.0
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
        L[m, :m] = l.cpu()
        L[m, m] = Ljj
        self.L = L
        self.t.append(tnew)
        self.members.append(j)
        self.inset[j] = True
        self.loss_abs -= tnew * tnew

    def weights(self, n, device) -> torch.Tensor:
        w = torch.zeros(n, dtype=torch.float64)
        if self.t:
            beta = torch.linalg.solve_triangular(self.L.T, torch.tensor(self.t, dtype=torch.float64)[:, None],
                                                 upper=True)[:, 0]
            w[self.members[1:]] = beta
            w[self.s0] = 1.0 - float(beta.sum())
        else:
            w[self.s0] = 1.0
        return w.to(device)


def refit_rows(rows: Rows, diag, b, yy, count, k, *, replacement=True, stop_loss=-1.0, tol=1e-9,
               exact_loss: Callable[[RefitState], float] | None = None) -> GramResult:
    """Refit: after each addition the chosen set's weights are re-fit by affine least squares
    (weights sum to 1, any sign). A step adds the candidate whose addition lowers the refit loss
    most (step 0: the single best candidate). `exact_loss(state)`, when given, replaces the loss
    from the statistics (the streaming engine passes ||y - z||^2 / M from the rebuilt z)."""
    N, M = b.shape[0], float(count)
    s0 = int(torch.argmin(diag - 2.0 * b))
    st = RefitState(diag, b, yy, rows(s0), s0, tol)
    loss_of = exact_loss or (lambda s: s.loss_abs / M)
    picked = torch.zeros(N, dtype=torch.bool, device=b.device)
    picked[s0] = True
    _, _, num = st.scores()
    picks, losses, gaps, gammas = [s0], [loss_of(st)], [2.0 * float(num.max()) / M], [1.0]
    for _t in range(1, k if losses[0] > stop_loss else 1):
        rho, ok, _ = st.scores()
        if not replacement:
            rho = rho.masked_fill(picked, -math.inf)
        j = int(torch.argmax(rho))  # first maximum: ties to the lowest index
        picked[j] = True
        gamma = 0.0
        if bool(ok[j]):
            st.add(j, rows(j))
            gamma = 1.0
        _, _, num = st.scores()
        picks.append(j)
        losses.append(loss_of(st) if gamma else losses[-1])
        gaps.append(2.0 * float(num.max()) / M)
        gammas.append(gamma)
        if losses[-1] <= stop_loss:
            break
    return _pack(picks, losses, gaps, gammas, st.weights(N, b.device), b.device)


__all__ = ["GramResult", "run", "choose", "availability", "uniform_rows", "line_search_rows", "refit_rows",
           "RefitState", "line_search_scores", "line_search_weights", "tolerance", "gfs_kernels"]

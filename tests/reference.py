"""Float64 brute-force greedy forward selection, written from docs/design.md section 1 alone.

Independent of every kernel: each candidate's loss ||y - (t z + u_j)/(t+1)||^2 is computed
directly (no expansion, no norms trick), in float64, on the values the backends see (half
precision inputs are upcast first).
"""

from __future__ import annotations

import numpy as np


def brute_force_uniform(U, y, k, replacement=True, stop_loss=-1.0):
    """Returns (picks, losses, gaps, all_losses) with all_losses[t][j] the step-t loss of j."""
    U = np.asarray(U, dtype=np.float64).reshape(len(U), -1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    N, M = U.shape
    z = np.zeros(M)
    picks, losses, gaps, all_losses = [], [], [], []
    for t in range(k):
        cand = (t * z[None, :] + U) / (t + 1)
        loss_j = ((y[None, :] - cand) ** 2).sum(1) / M
        if not replacement:
            loss_j[picks] = np.inf
        j = int(np.argmin(loss_j))  # first minimum
        z = cand[j]
        picks.append(j)
        losses.append(loss_j[j])
        all_losses.append(loss_j)
        gaps.append(fw_gap(U, y, z))
        if losses[-1] <= stop_loss:
            break
    return picks, np.array(losses), np.array(gaps), all_losses


def fw_gap(U, y, z):
    """max_j <2 (y - z), u_j - z> / M."""
    return float(np.max((U - z) @ (2 * (y - z)))) / U.shape[1]


def check_path(U, y, picks, losses, *, replacement=True, rtol=1e-5, atol=1e-9, distinct_ties=True):
    """Follow a backend's own picks and check that each was a float64 argmin up to rounding
    (a pick may differ from the reference only where the two losses agree to rtol), that exact
    ties went to the lowest index, and that its losses are the true ones. Returns the number of
    steps whose pick differed from the strict float64 argmin. distinct_ties=False enforces the
    lowest index only between identical candidates: distinct candidates whose losses tie in exact
    arithmetic (data of a few bits) are ordered by the rounding of the accumulation dtype."""
    U = np.asarray(U, dtype=np.float64).reshape(len(U), -1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    N, M = U.shape
    z = np.zeros(M)
    used = []
    differing = 0
    for t, j in enumerate(picks):
        cand = (t * z[None, :] + U) / (t + 1)
        loss_j = ((y[None, :] - cand) ** 2).sum(1) / M
        if not replacement:
            assert j not in used, f"step {t}: {j} picked twice without replacement"
            loss_j[used] = np.inf
        best = int(np.argmin(loss_j))
        if j != best:
            differing += 1
            assert loss_j[j] <= loss_j[best] * (1 + rtol) + atol, (
                f"step {t}: picked {j} (loss {loss_j[j]!r}) but {best} has loss {loss_j[best]!r}"
            )
            if distinct_ties or np.array_equal(U[j], U[best]):
                assert loss_j[j] != loss_j[best], (
                    f"step {t}: exact tie between {best} and {j} not sent to the lowest index"
                )
        assert abs(losses[t] - loss_j[j]) <= rtol * abs(loss_j[j]) + atol, (
            f"step {t}: reported loss {losses[t]!r}, true {loss_j[j]!r}"
        )
        z = cand[j]
        used.append(j)
    return differing


def path_gaps(U, y, picks):
    """The Frank-Wolfe gap after each of the given picks (uniform rule), in float64."""
    U = np.asarray(U, dtype=np.float64).reshape(len(U), -1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    z = np.zeros(U.shape[1])
    out = []
    for t, j in enumerate(picks):
        z = (t * z + U[j]) / (t + 1)
        out.append(fw_gap(U, y, z))
    return np.array(out)


def hull_optimum(U, y):
    """min over the convex hull of the rows of ||y - z||^2 / M, exactly, by enumerating the
    faces (for small N): on each subset solve least squares with sum(w) = 1 through its KKT
    system and keep the feasible (w >= 0) solutions."""
    from itertools import combinations

    U = np.asarray(U, dtype=np.float64).reshape(len(U), -1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    N, M = U.shape
    best = min(((y - u) ** 2).sum() for u in U)
    for size in range(2, N + 1):
        for S in combinations(range(N), size):
            A = U[list(S)]
            G = A @ A.T
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = 2 * G
            kkt[:size, size] = 1
            kkt[size, :size] = 1
            rhs = np.concatenate([2 * A @ y, [1.0]])
            w = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if np.all(w >= -1e-12) and abs(w.sum() - 1) < 1e-9:
                best = min(best, ((y - w @ A) ** 2).sum())
    return best / M


# -- line search (docs/design.md section 1: z <- z + gamma (u_j - z), gamma in [0, 1]) --------------------
def line_search_candidates(U, y, z, first):
    """For every candidate j: (loss of z + gamma_j (u_j - z), gamma_j), with gamma_j the closed-form
    minimiser <y - z, d> / ||d||^2 clipped to [0, 1] (0 when d = 0); gamma = 1 at step 0."""
    N, M = U.shape
    D = U - z[None, :]
    if first:
        gam = np.ones(N)
    else:
        dd = (D * D).sum(1)
        rd = (D * (y - z)[None, :]).sum(1)  # row-wise (not gemv): identical rows, identical values
        gam = np.where(dd > 0, np.clip(rd / np.where(dd > 0, dd, 1.0), 0.0, 1.0), 0.0)
    cand = z[None, :] + gam[:, None] * D
    return ((y[None, :] - cand) ** 2).sum(1) / M, gam


def brute_force_line_search(U, y, k, replacement=True, stop_loss=-1.0):
    """Returns (picks, losses, gaps, gammas, weights)."""
    U = np.asarray(U, dtype=np.float64).reshape(len(U), -1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    N, M = U.shape
    z, w = np.zeros(M), np.zeros(N)
    picks, losses, gaps, gammas = [], [], [], []
    for t in range(k):
        loss_j, gam = line_search_candidates(U, y, z, t == 0)
        if not replacement:
            loss_j[picks] = np.inf
        j = int(np.argmin(loss_j))
        g = gam[j]
        z = z + g * (U[j] - z)
        w = (1 - g) * w
        w[j] += g
        picks.append(j)
        losses.append(loss_j[j])
        gaps.append(fw_gap(U, y, z))
        gammas.append(g)
        if losses[-1] <= stop_loss:
            break
    return picks, np.array(losses), np.array(gaps), np.array(gammas), w


def check_line_search_path(U, y, picks, gammas, losses, *, replacement=True, rtol=1e-7, atol=1e-10, distinct_ties=True):
    """Follow a selection's own (pick, gamma) path: each pick must be a float64 argmin of the
    line-search loss up to rounding, its gamma the optimal one (where that matters), and the
    reported losses the true ones. Returns the final z."""
    U = np.asarray(U, dtype=np.float64).reshape(len(U), -1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    z = np.zeros(U.shape[1])
    used = []
    scale = atol + rtol * float((y * y).mean() + (U * U).mean(1).max())
    for t, (j, g) in enumerate(zip(picks, gammas, strict=True)):
        loss_j, gam = line_search_candidates(U, y, z, t == 0)
        if not replacement:
            assert j not in used, f"step {t}: {j} picked twice without replacement"
            loss_j[used] = np.inf
        best = int(np.argmin(loss_j))
        assert loss_j[j] <= loss_j[best] + scale, (
            f"step {t}: picked {j} (loss {loss_j[j]!r}), {best} has {loss_j[best]!r}"
        )
        if j != best and (distinct_ties or np.array_equal(U[j], U[best])):
            assert loss_j[j] != loss_j[best], f"step {t}: exact tie between {best} and {j} not sent to the lowest index"
        z_new = z + g * (U[j] - z)
        true = float(((y - z_new) ** 2).mean())
        assert abs(true - loss_j[j]) <= scale, f"step {t}: gamma {g} is not optimal for {j} ({true} vs {loss_j[j]})"
        assert abs(losses[t] - true) <= scale, f"step {t}: reported loss {losses[t]!r}, true {true!r}"
        z = z_new
        used.append(j)
    return z


# -- refit (affine least squares over the chosen set, weights summing to 1) ---------------------
def affine_fit(U, y, S):
    """min ||y - sum_{i in S} w_i u_i||^2 / M subject to sum w = 1, by substituting
    w_0 = 1 - sum of the others and solving the unconstrained least squares (numpy lstsq; a
    singular set gets the minimum-norm solution). Returns (loss, weights over S, z)."""
    A = U[list(S)]
    if len(S) == 1:
        z = A[0]
        return float(((y - z) ** 2).mean()), np.ones(1), z
    D = (A[1:] - A[0]).T
    coef = np.linalg.lstsq(D, y - A[0], rcond=None)[0]
    z = A[0] + D @ coef
    return float(((y - z) ** 2).mean()), np.concatenate([[1 - coef.sum()], coef]), z


def refit_candidates(U, y, S):
    """The refit loss of adding each candidate to the set S (S itself for members)."""
    out = np.empty(len(U))
    for j in range(len(U)):
        out[j] = affine_fit(U, y, S if j in S else [*S, j])[0]
    return out


def brute_force_refit(U, y, k, replacement=True, stop_loss=-1.0):
    """Returns (picks, losses, gaps, weights): each step adds the candidate whose addition gives the
    lowest affine least-squares loss of the chosen set."""
    U = np.asarray(U, dtype=np.float64).reshape(len(U), -1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    N, M = U.shape
    S, picks, losses, gaps = [], [], [], []
    w = np.zeros(N)
    for _ in range(k):
        loss_j = refit_candidates(U, y, S) if S else ((y[None] - U) ** 2).mean(1)
        if not replacement:
            loss_j[picks] = np.inf
        j = int(np.argmin(loss_j))
        if j not in S:
            S.append(j)
        loss, wS, z = affine_fit(U, y, S)
        w = np.zeros(N)
        w[S] = wS
        picks.append(j)
        losses.append(loss)
        gaps.append(fw_gap(U, y, z))
        if loss <= stop_loss:
            break
    return picks, np.array(losses), np.array(gaps), w


def check_refit_path(U, y, picks, losses, gaps, weights, *, replacement=True, rtol=1e-7, atol=1e-10):
    """Follow a selection's own picks: each must lower the refit loss as much as the best
    candidate up to rounding, the reported losses and gaps must be the true ones, and the final
    weights must sum to 1, live on the picks, and reproduce the final loss."""
    U = np.asarray(U, dtype=np.float64).reshape(len(U), -1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    N, M = U.shape
    scale = atol + rtol * float((y * y).mean() + (U * U).mean(1).max())
    S, used = [], []
    for t, j in enumerate(picks):
        loss_j = refit_candidates(U, y, S) if S else ((y[None] - U) ** 2).mean(1)
        if not replacement:
            assert j not in used, f"step {t}: {j} picked twice without replacement"
            loss_j[used] = np.inf
        best = int(np.argmin(loss_j))
        assert loss_j[j] <= loss_j[best] + scale, (
            f"step {t}: picked {j} (loss {loss_j[j]!r}), {best} has {loss_j[best]!r}"
        )
        if j not in S:
            S.append(j)
        used.append(j)
        loss, _, z = affine_fit(U, y, S)
        assert abs(losses[t] - loss) <= scale, f"step {t}: reported loss {losses[t]!r}, true {loss!r}"
        g = fw_gap(U, y, z)
        assert abs(gaps[t] - g) <= 10 * scale + 1e-6 * abs(g), f"step {t}: reported gap {gaps[t]!r}, true {g!r}"
    w = np.asarray(weights, dtype=np.float64)
    assert abs(w.sum() - 1) < 1e-8, f"weights sum to {w.sum()!r}"
    assert np.all(w[[i for i in range(N) if i not in S]] == 0), "weight outside the chosen set"
    zw = w @ U
    spread = (1 + np.abs(w).sum()) ** 2  # cancellation in sum_j w_j u_j grows with |w|
    assert abs(float(((y - zw) ** 2).mean()) - losses[-1]) <= 10 * scale * spread, (
        "weights do not reproduce the final loss"
    )

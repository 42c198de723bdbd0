"""Float64 brute-force greedy forward selection, written from DESIGN.md section 1 alone.

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


def check_path(U, y, picks, losses, *, replacement=True, rtol=1e-5, atol=1e-9):
    """Follow a backend's own picks and check that each was a float64 argmin up to rounding
    (a pick may differ from the reference only where the two losses agree to rtol), that exact
    ties went to the lowest index, and that its losses are the true ones. Returns the number of
    steps whose pick differed from the strict float64 argmin."""
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
            assert loss_j[j] != loss_j[best], f"step {t}: exact tie between {best} and {j} not sent to the lowest index"
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

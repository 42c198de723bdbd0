"""The streaming engine: features in memory, one pass over U per step through a backend.

- "uniform": the backend's `greedy_uniform` (one native call where the backend has one).
- "line_search": z and r = y - z kept in float64; each step one `dots(U, r)` pass gives
  e_j = <r, u_j>, hence c_j = <z, u_j> = b_j - e_j, and every candidate's optimal gamma in closed
  form; losses are the exact ||y - z||^2 / M.
- "refit": the Gram engine's refit loop (gram.refit_rows) with the one row of G it needs per step,
  G[j, :] = U u_j, computed by one `dots(U, u_j)` pass; z is rebuilt from the weights each step so
  the reported loss is the exact ||y - z||^2 / M.
Each step rule reports the Frank-Wolfe gap per step.
"""
from __future__ import annotations

import math

import torch

import gfs_kernels
from gfs_kernels import host_stream
from gfs_kernels.base import Backend, GreedyResult, _gap

from . import gram


def run(backend: Backend, U: torch.Tensor, y: torch.Tensor, k: int, *, step: str, replacement: bool,
        stop_loss: float, device: torch.device | None = None) -> GreedyResult:
    """Run `step` for at most k steps; U (N, M) contiguous, y (M,) in the accumulation dtype.
    The result's notes carry "gammas" (step sizes) and, for line_search / refit, "weights".

    `device`: where the backend runs when U is elsewhere (a GPU backend given host memory): U
    is moved there once when it fits, else (uniform rule) streamed from the host every step
    (gfs_kernels.host_stream); notes["host_stream"] says which."""
    if device is not None and U.device != device:
        if step == "uniform":
            return host_stream.run_greedy_uniform(backend, U, y, k, replacement, stop_loss, device)
        if host_stream.placement(U, device) == "stream":
            raise ValueError(
                f"features ({U.numel() * U.element_size() / 2**30:.2f} GiB in host memory) do not fit in the free "
                f"memory of {device}, and only the uniform rule streams them from the host; use step='uniform', "
                f"the Gram engine (engine='gram'), or the cpu backend"
            )
        res = run(backend, U.to(device), y.to(device), k, step=step, replacement=replacement, stop_loss=stop_loss)
        res.notes["host_stream"] = f"U moved to {device} once (it fits in the free device memory)"
        return res
    if step == "uniform":
        return backend.greedy_uniform(U, y, k, replacement, stop_loss)
    tol = gram.tolerance(torch.float64 if y.dtype == torch.float64 else torch.float32)
    if step == "line_search":
        return line_search(backend, U, y, k, replacement, stop_loss, tol)
    if step == "refit":
        return refit(backend, U, y, k, replacement, stop_loss, tol)
    raise ValueError(f"unknown step {step!r}")


def line_search(backend: Backend, U, y, k, replacement, stop_loss, tol) -> GreedyResult:
    N, M = U.shape
    acc = y.dtype
    norms, b = backend.prepare(U, y)
    norms, b = norms.double(), b.double()
    y64 = y.double()
    z = torch.zeros_like(y64)
    r = y64.clone()
    zz = zb = 0.0
    taken = torch.zeros(N, dtype=torch.bool, device=U.device)
    picks, losses, gaps, gammas = [], [], [], []
    for t in range(k):
        if t == 0:
            j, gamma = int(torch.argmin(norms - 2.0 * b)), 1.0
        else:
            e = backend.dots(U, r.to(acc)).double()
            gaps.append(_gap(e, r, z, M))
            rho, gam, _ = gram.line_search_scores(norms, b, b - e, zb, zz, tol)
            if not replacement:
                rho = rho.masked_fill(taken, -math.inf)
            j = int(torch.argmax(rho))  # first maximum: ties to the lowest index
            gamma = float(gam[j])
        taken[j] = True
        if gamma > 0:
            z = z + gamma * (U[j].double() - z)
            r = y64 - z
        zz, zb = float(z @ z), float(z @ y64)
        picks.append(j)
        losses.append(float(r @ r) / M)
        gammas.append(gamma)
        if losses[-1] <= stop_loss:
            break
    gaps.append(_gap(backend.dots(U, r.to(acc)), r, z, M))
    dev = U.device
    w = gram.line_search_weights(picks, gammas, N, dev)
    return GreedyResult(
        torch.tensor(picks, dtype=torch.int64, device=dev),
        torch.tensor(losses, dtype=torch.float64, device=dev),
        torch.tensor(gaps, dtype=torch.float64, device=dev),
        notes={"gammas": torch.tensor(gammas, dtype=torch.float64), "weights": w},
    )


def refit(backend: Backend, U, y, k, replacement, stop_loss, tol) -> GreedyResult:
    N, M = U.shape
    acc = y.dtype
    norms, b = backend.prepare(U, y)
    y64 = y.double()

    def rows(j: int) -> torch.Tensor:  # G[j, :] = U u_j, one pass over U
        return backend.dots(U, U[j].to(acc)).double()

    res = gram.refit_rows(rows, norms.double(), b.double(), float(y64 @ y64), M, k, replacement=replacement,
                          stop_loss=stop_loss, tol=tol, exact_loss=lambda st: _exact_loss(st, U, y64))
    return GreedyResult(res.indices, res.losses, res.gaps,
                        notes={"gammas": res.gammas.cpu(), "weights": res.weights})


def _exact_loss(st: "gram.RefitState", U: torch.Tensor, y64: torch.Tensor) -> float:
    """||y - z||^2 / M with z = sum_j w_j u_j rebuilt from the current weights (O(M |set|))."""
    members = torch.tensor(st.members, device=U.device)
    w = st.weights(U.shape[0], U.device)[members]
    z = w @ U[members].double()
    r = y64 - z
    return float(r @ r) / U.shape[1]


def dense_loss(U: torch.Tensor, y: torch.Tensor) -> float:
    """||y - mean_j u_j||^2 / M: the loss of the dense network (the uniform average)."""
    mean = U.sum(0, dtype=y.dtype).double() / U.shape[0]
    return float(((y.double() - mean) ** 2).mean())


def uniform_weights(indices: torch.Tensor, n: int) -> torch.Tensor:
    """counts / steps: the uniform rule's weights."""
    counts = torch.bincount(indices, minlength=n).double()
    return counts / counts.sum()


__all__ = ["run", "line_search", "refit", "dense_loss", "uniform_weights", "gfs_kernels"]

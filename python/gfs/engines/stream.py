"""The streaming engine: features in memory, one pass over U per step through a backend.

`run` executes a plan (gfs.engines.plan): the uniform rule through the backend's whole native
loop where it has one (else gfs.engines.uniform's loop over `prepare` / `dots`), line_search and
refit through their modules' streaming loops. Features in host memory for a GPU backend are
moved there once, or streamed from the host every step (gfs_kernels.host_stream), as planned.
"""

from __future__ import annotations

import torch

from gfs_kernels import host_stream
from gfs_kernels.base import Backend, LoopResult

from . import gram, line_search, refit, uniform
from .plan import Plan


def run(
    p: Plan, U: torch.Tensor, y: torch.Tensor, k: int, *, step: str, replacement: bool, stop_loss: float
) -> LoopResult:
    """Run `step` for at most k steps on plan `p`; U (N, M) contiguous, y (M,) in the
    accumulation dtype. notes["host_stream"] says where host features went."""
    if p.placement == "stream":
        return host_stream.greedy_uniform_streamed(p.backend, U, y, k, replacement, stop_loss, device=p.device)
    if p.placement == "upload":
        res = run_on(
            p.backend, U.to(p.device), y.to(p.device), k, step=step, replacement=replacement, stop_loss=stop_loss
        )
        res.notes["host_stream"] = f"U moved to {p.device} once (it fits in the free device memory)"
        return res
    return run_on(p.backend, U, y, k, step=step, replacement=replacement, stop_loss=stop_loss)


def run_on(
    backend: Backend, U: torch.Tensor, y: torch.Tensor, k: int, *, step: str, replacement: bool, stop_loss: float
) -> LoopResult:
    """Run `step` with `backend` on U where it is."""
    if step == "uniform":
        if backend.native_uniform:
            return backend.greedy_uniform(U, y, k, replacement, stop_loss)
        return uniform.stream_loop(backend, U, y, k, replacement, stop_loss)
    tol = gram.tolerance(torch.float64 if y.dtype == torch.float64 else torch.float32)
    loop = {"line_search": line_search.stream_loop, "refit": refit.stream_loop}[step]
    return loop(backend, U, y, k, replacement, stop_loss, tol)


def dense_loss(U: torch.Tensor, y: torch.Tensor) -> float:
    """||y - mean_j u_j||^2 / M: the loss of the dense network (the uniform average)."""
    mean = U.sum(0, dtype=y.dtype).double() / U.shape[0]
    return float(((y.double() - mean) ** 2).mean())

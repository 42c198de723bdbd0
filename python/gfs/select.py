"""gfs.select: greedy forward selection of candidates, the one entry point."""
from __future__ import annotations

import time

import torch

import gfs_kernels
from gfs_kernels.base import accumulation_dtype

from . import _validation as check
from .engines import stream
from .selection import Selection


def select(features, targets, k, *, replacement=True, step="uniform", eps=None, backend="auto") -> Selection:
    """Greedy forward selection: grow a subnetwork one candidate at a time.

    Starting from z = 0, step t picks the candidate whose addition lowers the loss most,
    j* = argmin_j ||y - (t z + u_j) / (t + 1)||^2, and sets z = (t z + u_j*) / (t + 1)
    (Ye et al., ICML 2020). Ties go to the lowest index.

    Parameters
    ----------
    features : Tensor or ndarray, shape (N, M) or (N, *S)
        Row j is candidate j's output u_j over the calibration data. float32, float64, float16
        or bfloat16; accumulation is in float32 (float64 for float64).
    targets : Tensor or ndarray, shape (M,) or (*S)
        The target y, e.g. the dense network's output (local imitation).
    k : int
        Number of steps (the cap when eps is given).
    replacement : bool
        Allow a candidate to be picked again (its weight grows). False forbids it; k <= N then.
    step : {"uniform", "line_search", "refit"}
        The step rule (DESIGN section 1). Only "uniform" is available yet.
    eps : float, optional
        Stop once loss <= dense_loss + eps (the papers' stopping rule).
    backend : str
        "auto" (the fastest usable), or a name from gfs.backends().

    Returns
    -------
    Selection
        indices, support, weights, losses, gaps, dense_loss, backend, timings, ...

    Examples
    --------
    >>> import torch, gfs
    >>> U, y = torch.randn(100, 512), torch.randn(512)
    >>> sel = gfs.select(U, y, k=10)
    >>> sel.indices.shape, float(sel.weights.sum())
    (torch.Size([10]), 1.0)
    """
    t0 = time.perf_counter()
    eps = check.check_options(step, eps, replacement)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {['auto', *gfs_kernels.names()]}")
    if backend != "auto":
        chosen = gfs_kernels.get(backend)  # ValueError naming the known backends
    U, y = check.features_and_targets(features, targets)
    N = U.shape[0]
    k = check.check_k(k, N, bool(replacement))
    if backend == "auto":
        chosen, reason = gfs_kernels.choose(U.device, U.dtype)
    else:
        why_not = chosen.supports(U.device, U.dtype)
        if why_not:
            raise ValueError(f"backend {backend!r} cannot run here: {why_not}; use backend='auto' or another of {gfs_kernels.names()}")
        reason = "requested"
    y = y.to(accumulation_dtype(U.dtype))
    t1 = time.perf_counter()

    dense = stream.dense_loss(U, y)
    stop_loss = -1.0 if eps is None else dense + eps
    t2 = time.perf_counter()

    result = stream.run(chosen, U, y, k, step=step, replacement=bool(replacement), stop_loss=stop_loss)
    indices = result.indices.cpu()
    t3 = time.perf_counter()

    return Selection(
        indices=indices,
        support=torch.unique(indices),
        weights=stream.uniform_weights(indices, N),
        losses=result.losses.cpu(),
        gaps=result.gaps.cpu(),
        dense_loss=dense,
        backend=chosen.name,
        engine="stream",
        step=step,
        replacement=bool(replacement),
        reason=reason,
        seconds=t3 - t0,
        timings={"validate": t1 - t0, "dense": t2 - t1, "select": t3 - t2},
        notes=dict(result.notes),
    )


def backends(device="cpu", dtype=torch.float32) -> dict[str, str | None]:
    """Every registered backend and None if it can run on (device, dtype), else why not."""
    return gfs_kernels.availability(device, dtype)

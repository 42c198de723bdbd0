"""gfs.select: greedy forward selection of candidates, the one entry point."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

import gfs_kernels
from gfs_kernels.base import accumulation_dtype

from . import _scale
from . import _validation as check
from .engines import gram, stream
from .engines.plan import plan
from .selection import Selection
from .stats import GramStats


def select(
    features: torch.Tensor | np.ndarray | GramStats,
    targets: torch.Tensor | np.ndarray | None = None,
    k: int | None = None,
    *,
    replacement: bool = True,
    step: str = "uniform",
    eps: float | None = None,
    backend: str = "auto",
    engine: str = "auto",
) -> Selection:
    """Greedy forward selection: grow a subnetwork one candidate at a time.

    Starting from the empty subnetwork, each step adds the candidate that lowers the loss
    ||y - z||^2 / M most under the step rule (Ye et al., ICML 2020; NeurIPS 2020). Ties go to the
    lowest index.

    Parameters
    ----------
    features : Tensor, ndarray or GramStats
        Either the candidates' outputs, shape (N, M) or (N, *S), row j = u_j (float32, float64,
        float16 or bfloat16; accumulation in float32, float64 for float64), or sufficient
        statistics `gfs.GramStats` (then `targets` must be None: the target is in the statistics,
        and the Gram engine runs).
    targets : Tensor or ndarray, shape (M,) or (*S)
        The target y, e.g. the dense network's output (local imitation). Required with features.
    k : int
        Number of steps (the cap when eps is given). Required.
    replacement : bool
        Allow a candidate to be picked again. False forbids it; k <= N then.
    step : {"uniform", "line_search", "refit"}
        The step rule; z is the subnetwork's output, w its weights (always summing to 1):

        - "uniform": z_{t+1} = (t z_t + u_j) / (t + 1), j the best such addition; w = counts / t.
        - "line_search": z <- z + gamma (u_j - z) with (j, gamma) the joint minimiser of the loss,
          gamma in [0, 1] in closed form (step 0: the single best candidate, gamma = 1);
          w <- (1 - gamma) w + gamma e_j. The loss never increases.
        - "refit": fully corrective. After each addition the chosen set's weights are re-fit by
          *affine* least squares: min ||y - sum_{j in S} w_j u_j||^2 subject to sum w_j = 1 (the
          weights keep summing to 1 like the other rules, but may be negative), solved through
          an incrementally updated Cholesky factor. A step adds the candidate whose addition
          lowers this refit loss most (step 0: the single best candidate), like orthogonal least
          squares. A candidate whose direction is degenerate (a duplicate, or already spanned)
          lowers nothing; if it is picked anyway (nothing else helps) the fit is unchanged.
          replacement=True lets such no-change steps repeat a candidate.
    eps : float, optional
        Stop once loss <= dense_loss + eps (the papers' stopping rule).
    backend : str
        "auto", or a backend name: for the streaming engine one of gfs.backends(); for the Gram
        engine "cpu" (native loop), "triton" (GPU, uniform rule) or "torch".
        A named backend with engine="auto" runs the streaming engine.
    engine : {"auto", "stream", "gram"}
        "stream" passes over the features once per step; "gram" builds G = U U^T, b = U y once
        (gfs.GramStats) and then needs O(N) per step. "auto" chooses by an explicit cost model of
        (N, M, k, dtype, step, free memory), see gfs.engines.cost; the choice and its estimates
        are in Selection.reason.

    Returns
    -------
    Selection
        indices, support, weights, losses, gaps (Frank-Wolfe gap per step), dense_loss, backend,
        engine, reason, timings; notes["gammas"] holds the step sizes.

    Examples
    --------
    >>> import torch, gfs
    >>> U, y = torch.randn(100, 512), torch.randn(512)
    >>> sel = gfs.select(U, y, k=10)
    >>> sel.indices.shape, round(float(sel.weights.sum()), 12)  # counts / k: 1 up to rounding
    (torch.Size([10]), 1.0)
    >>> stats = gfs.GramStats.from_features(U, y)
    >>> gfs.select(stats, k=10, step="line_search").engine
    'gram'
    """
    t0 = time.perf_counter()
    if k is None:
        raise TypeError("k is missing: pass the number of selection steps, e.g. gfs.select(features, targets, k=64)")
    eps = check.check_options(step, eps, replacement)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {['auto', *gfs_kernels.names()]}")
    replacement = bool(replacement)

    if isinstance(features, GramStats):
        if targets is not None:
            raise ValueError(
                "targets must be None when features is a GramStats: the target is already in the statistics "
                "(b and yy); pass gfs.select(stats, k=...)"
            )
        p = plan(
            features.n, 0, 1, torch.float64, step, features.device, engine=engine, backend=backend, from_stats=True
        )
        # products still pending from the last update() are added into G first: the end of
        # building the statistics, timed as "stats"
        t1 = time.perf_counter()
        features._finish()
        t2 = time.perf_counter()
        # O(N^2) checks only for statistics not known valid (loaded, or changed by hand)
        features._check_for_selection("stats")
        k = check.check_k(k, features.n, replacement)
        sel = _run_gram(p, features, k, replacement, step, eps, t0)
        timings = dict(sel.timings)
        sel.timings = {"stats": t2 - t1, **timings, "validate": timings["validate"] - (t2 - t1)}
        return sel

    if backend != "auto":
        gfs_kernels.get(backend)  # an unknown name is an error before the data are checked
    U, y, amax = check.features_and_targets(features, targets)
    N, M = U.shape
    k = check.check_k(k, N, replacement)
    p = plan(N, M, k, U.dtype, step, U.device, engine=engine, backend=backend)
    if p.engine == "gram":
        t1 = time.perf_counter()
        stats = GramStats(N, device=U.device).update(U, y, _amax=amax)  # U, y validated above
        t2 = time.perf_counter()
        sel = _run_gram(p, stats, k, replacement, step, eps, t0)
        sel.timings = {
            "validate": t1 - t0,
            "stats": t2 - t1,
            **{n: v for n, v in sel.timings.items() if n != "validate"},
        }
        return sel

    y = y.to(accumulation_dtype(U.dtype))
    # magnitudes the accumulation dtype cannot square and sum: an exact power-of-two rescale
    # (the argmin is unchanged; losses and gaps are reported in the caller's units)
    e = _scale.rescale_exponent(amax, U.dtype, M, step)
    if e:
        U, y = _scale.ldexp(U, -e), _scale.ldexp(y, -e)
    t1 = time.perf_counter()
    dense = stream.dense_loss(U, y)
    stop_loss = -1.0 if eps is None else dense + _scale.ldexp_float(eps, -2 * e)
    t2 = time.perf_counter()
    res = stream.run(p, U, y, k, step=step, replacement=replacement, stop_loss=stop_loss)
    t3 = time.perf_counter()
    reason = p.reason + (f"; {res.notes['host_stream']}" if "host_stream" in res.notes else "")
    if e:
        res.notes["rescaled"] = (
            f"features and targets multiplied by 2^{-e} (exact) for {accumulation_dtype(U.dtype)} sums"
        )
    return _selection(
        res,
        2 * e,
        _scale.ldexp_float(dense, 2 * e),
        p,
        step,
        replacement,
        reason,
        t3 - t0,
        {"validate": t1 - t0, "dense": t2 - t1, "select": t3 - t2},
    )


def _run_gram(p, stats: GramStats, k, replacement, step, eps, t0) -> Selection:
    t1 = time.perf_counter()
    dense = stats.dense_loss
    G, b, yy = stats.G, stats.b, stats.yy
    # line_search and refit form products of these sums (fourth powers of the data): statistics
    # far from 1 are multiplied by a power of two for the loop (exact; losses reported unscaled)
    e = _stats_exponent(G, yy) if step != "uniform" else 0
    if e:
        G, b, yy = _scale.ldexp(G, -e), _scale.ldexp(b, -e), math.ldexp(yy, -e)
    stop_loss = -1.0 if eps is None else math.ldexp(dense + eps, -e)
    t2 = time.perf_counter()
    res = gram.run(
        p.backend,
        G,
        b,
        yy,
        stats.count,
        k,
        step=step,
        replacement=replacement,
        stop_loss=stop_loss,
        tol=gram.tolerance(stats.precision),
    )
    t3 = time.perf_counter()
    losses = _scale.ldexp(res.losses.cpu(), e)
    floor = -stats.rtol * (stats.yy + float(torch.diagonal(stats.G).max())) / stats.count
    if float(losses.min()) < floor:
        t = int(torch.argmin(losses))
        raise ValueError(
            f"stats are not positive semi-definite: the loss after step {t} would be {float(losses[t]):.6g} < 0; "
            f"the statistics are corrupted (a damaged file, or statistics of other candidates merged in); rebuild them"
        )
    res.losses = res.losses.clamp_min(0.0)
    return _selection(
        res,
        e,
        dense,
        p,
        step,
        replacement,
        p.reason,
        t3 - t0,
        {"validate": t1 - t0, "dense": t2 - t1, "select": t3 - t2},
    )


def _selection(res, e: int, dense: float, p, step, replacement, reason, seconds, timings) -> Selection:
    """The Selection of a loop's result, losses and gaps multiplied by 2^e (the caller's units)."""
    indices = res.indices.cpu()
    notes = dict(res.notes)
    notes["gammas"] = res.gammas.cpu()
    return Selection(
        indices=indices,
        support=torch.unique(indices),
        weights=res.weights.cpu(),
        losses=_scale.ldexp(res.losses.cpu(), e),
        gaps=_scale.ldexp(res.gaps.cpu(), e),
        dense_loss=dense,
        backend=p.backend.name,
        engine=p.engine,
        step=step,
        replacement=replacement,
        reason=reason,
        seconds=seconds,
        timings=timings,
        notes=notes,
    )


def _stats_exponent(G: torch.Tensor, yy: float) -> int:
    """0 when squares of the statistics' entries are comfortably float64 numbers, else the
    exponent e of their magnitude (dividing by 2^e brings them near 1)."""
    g = max(float(torch.diagonal(G).max()), yy)
    e = math.frexp(g)[1] if g > 0 else 0
    return e if not -450 < e < 450 else 0


def backends(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, str | None]:
    """Every registered backend and None if it can run on (device, dtype), else why not."""
    return gfs_kernels.availability(device, dtype)

"""Diagnostics of a selection problem, and the paper's Appendix C experiment.

Notation (DESIGN.md section 1): candidates u_1..u_N in R^M (rows of U), target y in R^M, and
gfs's loss f(z) = ||y - z||^2 / M (the per-entry mean, as in `Selection.losses`). C is the convex
hull of the u_j; the dense network is the uniform average u_bar = mean_j u_j, a point of C.

Every diagnostic is available from features (U, y) or from Gram statistics: any object with
attributes G (N x N, = U U^T), b (N, = U y), yy (= ||y||^2) and count (= M), such as
`gfs.stats.GramStats` (duck-typed: nothing is imported from it).

The bound (`greedy_bound`), stated precisely
--------------------------------------------
Let z_1, z_2, ... be the iterates of the uniform rule *with replacement* (`gfs.select(...,
step="uniform", replacement=True)`), z_k the average of the first k picks, and let
D^2 = max_{i,j} ||u_i - u_j||^2 / M (the squared diameter of C, per entry; by the paper's
Lemma 2 the diameter of a polytope is the largest distance between two of its vertices). Then for
every point z* of C and every k >= 1:

    f(z_k) <= f(z*) + ( f(z_1) - f(z*) + D^2 (H_k - 1) ) / k,     H_k = 1 + 1/2 + ... + 1/k,

so f(z_k) - f(z*) = O(D^2 log k / k). `greedy_bound` takes z* = u_bar (the dense network:
the reference loss is `Selection.dense_loss`), which is always in C; any other point of C (such
as the hull optimum, if known) may be passed as `reference_loss`.

Proof sketch (Frank-Wolfe / herding style, our derivation). For k >= 1, z_k is in C. Let s be the
vertex minimising <grad f(z_k), u>; the greedy pick is at least as good as s, so
f(z_{k+1}) <= f(z_k + (s - z_k)/(k+1)) = f(z_k) + <grad f(z_k), s - z_k>/(k+1) + ||s - z_k||^2 / (M (k+1)^2).
Linear minimisation gives <grad f(z_k), s - z_k> <= <grad f(z_k), z* - z_k>, convexity bounds this
by f(z*) - f(z_k), and ||s - z_k||^2 <= M D^2 (both points are in C). With h_k = f(z_k) - f(z*):
(k+1) h_{k+1} <= k h_k + D^2/(k+1); summing from k = 1 gives the bound.

When it holds: the uniform rule with replacement, any targets y (y need not lie in C: the bound is
relative to f(z*)), any k. It does not cover replacement=False (a used vertex is no longer
available), nor the line-search or refit rules (they obey their own, faster bounds). The
herding-type O(D^2 / k) rate without the log needs more (y in the relative interior of C with a
margin) and is not what is drawn here.

The Frank-Wolfe gap g(z) = max_j <2 (y - z), u_j - z> / M bounds f(z) - min_C f from above, so
max_k (f(z_k) - g(z_k)) is a certified lower bound of the best loss any weighting of the
candidates can reach (`Diagnostics.hull_loss_lower_bound`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

_CHUNK_BYTES = 64 << 20


# --------------------------------------------------------------------------------------------
# The problem, from features or from Gram statistics
# --------------------------------------------------------------------------------------------


def _as_float64(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    return x.detach().to(device="cpu", dtype=torch.float64)


def _features(features, targets=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    U = _as_float64(features, "features")
    if U.dim() < 2 or U.shape[0] == 0:
        raise ValueError(f"features must have shape (N, M) or (N, *S) with N >= 1; got {tuple(U.shape)}")
    U = U.reshape(U.shape[0], -1)
    y = None
    if targets is not None:
        y = _as_float64(targets, "targets").reshape(-1)
        if y.numel() != U.shape[1]:
            raise ValueError(f"targets has {y.numel()} entries, features rows have {U.shape[1]}")
    return U, y


def _stats(stats) -> tuple[torch.Tensor, torch.Tensor | None, float | None, int]:
    """(G, b, yy, M) from a GramStats-like object."""
    missing = [a for a in ("G", "count") if not hasattr(stats, a)]
    if missing:
        raise TypeError(f"stats needs attributes G (N x N), b (N), yy and count (M); {type(stats).__name__} lacks {missing}")
    G = _as_float64(stats.G, "stats.G")
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"stats.G must be square (N x N), got {tuple(G.shape)}")
    b = _as_float64(stats.b, "stats.b").reshape(-1) if getattr(stats, "b", None) is not None else None
    yy = float(stats.yy) if getattr(stats, "yy", None) is not None else None
    M = int(stats.count)
    if M < 1:
        raise ValueError(f"stats.count must be >= 1 (the number of target entries), got {M}")
    return G, b, yy, M


def _pick(features, stats):
    if (features is None) == (stats is None):
        raise ValueError("pass features (with targets where needed) or stats, exactly one of them")


# --------------------------------------------------------------------------------------------
# Single diagnostics
# --------------------------------------------------------------------------------------------


def polytope_diameter(features=None, *, stats=None) -> float:
    """max_{i,j} ||u_i - u_j|| (Euclidean, not divided by M): the diameter of the convex hull
    of the candidates (Lemma 2: a polytope's diameter is attained at two vertices).

    From features the distances are computed in row blocks (O(N^2 M) work, O(block N) memory);
    from stats, ||u_i - u_j||^2 = G_ii + G_jj - 2 G_ij.
    """
    _pick(features, stats)
    if stats is not None:
        G, *_ = _stats(stats)
        d = torch.diagonal(G)
        return float(torch.sqrt((d[:, None] + d[None, :] - 2 * G).clamp_min(0).max()))
    U, _ = _features(features)
    norms = (U * U).sum(1)
    rows = max(1, _CHUNK_BYTES // (8 * max(1, U.shape[0])))
    best = 0.0
    for i in range(0, U.shape[0], rows):
        block = U[i : i + rows]
        d2 = norms[i : i + rows, None] + norms[None, :] - 2 * block @ U.T
        best = max(best, float(d2.clamp_min(0).max()))
    return math.sqrt(best)


def initial_loss(targets=None, *, stats=None) -> float:
    """f(z_0) = ||y||^2 / M: the loss of the empty subnetwork, where greedy selection starts."""
    if stats is not None:
        _, _, yy, M = _stats(stats)
        if yy is None:
            raise ValueError("stats.yy (||y||^2) is needed for the initial loss")
        return yy / M
    y = _as_float64(targets, "targets").reshape(-1)
    return float((y * y).mean())


@dataclass
class Spectrum:
    """Singular values of U (N x M), i.e. square roots of the eigenvalues of the Gram matrix on
    its smaller side (U U^T, N x N, when N <= M; U^T U, M x M, otherwise; both have the same
    non-zero eigenvalues). `sigma_min` is the smallest of the min(N, M) singular values, so it
    is 0 exactly when the candidates (N <= M) or the data points (N > M) are linearly dependent.
    condition = sigma_max / sigma_min (inf if sigma_min is 0); the Gram's eigenvalues are the
    squares, its condition number condition^2."""

    singular_values: torch.Tensor
    sigma_min: float
    sigma_max: float
    condition: float
    gram_min_eig: float
    gram_max_eig: float
    gram_condition: float
    side: str  # "candidates (N x N)" or "data (M x M)"


def _spectrum_from_eigs(eigs: torch.Tensor, side: str) -> Spectrum:
    eigs = eigs.clamp_min(0).sort(descending=True).values
    sv = eigs.sqrt()
    smin, smax = float(sv[-1]), float(sv[0])
    tiny = smax * 1e-12
    cond = smax / smin if smin > tiny else math.inf
    return Spectrum(sv, smin, smax, cond, float(eigs[-1]), float(eigs[0]), cond * cond, side)


def gram_spectrum(features=None, *, stats=None) -> Spectrum:
    """Smallest / largest singular value of the hidden-output (candidate) matrix U and the
    condition numbers of U and of its Gram matrix. From stats (G only, N x N): when N > M, G has
    N - M zero eigenvalues, and the M largest are used."""
    _pick(features, stats)
    if stats is not None:
        G, _, _, M = _stats(stats)
        eigs = torch.linalg.eigvalsh((G + G.T) / 2)
        r = min(G.shape[0], M)
        return _spectrum_from_eigs(eigs.sort(descending=True).values[:r], "candidates (N x N)" if G.shape[0] <= M else "data (from G, top M)")
    U, _ = _features(features)
    N, M = U.shape
    if N <= M:
        return _spectrum_from_eigs(torch.linalg.eigvalsh(U @ U.T), "candidates (N x N)")
    return _spectrum_from_eigs(torch.linalg.eigvalsh(U.T @ U), "data (M x M)")


def frank_wolfe_gap(weights, features=None, targets=None, *, stats=None) -> float:
    """g(z) = max_j <2 (y - z), u_j - z> / M for z = sum_j weights_j u_j: an upper bound on
    f(z) - min over the convex hull of f (weights on the simplex)."""
    _pick(features, stats)
    w = _as_float64(weights, "weights").reshape(-1)
    if stats is not None:
        G, b, _, M = _stats(stats)
        if b is None:
            raise ValueError("stats.b (U y) is needed for the Frank-Wolfe gap")
        Gw = G @ w
        zz, yz = float(w @ Gw), float(w @ b)
        return float((2 * (b - Gw - yz + zz)).max()) / M
    U, y = _features(features, targets)
    if y is None:
        raise ValueError("targets are needed for the Frank-Wolfe gap")
    z = w @ U
    r = y - z
    return float((2 * (U @ r - z @ r)).max()) / U.shape[1]


def greedy_bound(k: int, first_loss: float, reference_loss: float, diameter2: float) -> torch.Tensor:
    """The bound of the module docstring for steps 1..k (float64, length k):
    B_k = reference + (first_loss - reference + diameter2 * (H_k - 1)) / k,
    with diameter2 = max ||u_i - u_j||^2 / M and reference = f(z*) for a point z* of the hull
    (the dense loss for z* = mean_j u_j). B_1 = first_loss."""
    steps = torch.arange(1, k + 1, dtype=torch.float64)
    harmonic = torch.cumsum(1.0 / steps, 0)
    return reference_loss + (first_loss - reference_loss + diameter2 * (harmonic - 1)) / steps


# --------------------------------------------------------------------------------------------
# All of it at once
# --------------------------------------------------------------------------------------------


@dataclass
class Diagnostics:
    """Diagnostics of one selection problem (and of one selection run on it).

    Attributes
    ----------
    N, M : candidates and entries per candidate.
    diameter : max ||u_i - u_j|| (not divided by M). diameter2 = diameter^2 / M is the per-entry
        squared diameter that enters the bound.
    initial_loss : ||y||^2 / M (empty subnetwork). dense_loss : f(mean_j u_j).
    spectrum : `Spectrum` of U (smallest eigenvalue and condition number of the Gram).
    losses, gaps : the observed loss and Frank-Wolfe gap per step (from the selection).
    bound : `greedy_bound` per step (reference = dense loss); None where it does not apply.
    bound_applies : uniform rule with replacement. bound_holds : losses <= bound at every step
        (up to float tolerance); None where it does not apply.
    hull_loss_lower_bound : max_k (losses_k - gaps_k) <= min over the hull of f.
    """

    N: int
    M: int
    diameter: float
    diameter2: float
    initial_loss: float | None
    dense_loss: float | None
    spectrum: Spectrum | None
    losses: torch.Tensor | None = None
    gaps: torch.Tensor | None = None
    bound: torch.Tensor | None = None
    bound_applies: bool | None = None
    bound_holds: bool | None = None
    hull_loss_lower_bound: float | None = None
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"N={self.N} candidates, M={self.M} entries; diameter {self.diameter:.4g} (per-entry D^2 {self.diameter2:.4g})"]
        if self.initial_loss is not None:
            lines.append(f"initial loss {self.initial_loss:.4g}, dense loss {self.dense_loss:.4g}")
        if self.spectrum is not None:
            s = self.spectrum
            lines.append(f"sigma_min {s.sigma_min:.4g}, sigma_max {s.sigma_max:.4g}, condition {s.condition:.4g} "
                         f"(Gram: min eig {s.gram_min_eig:.4g}, condition {s.gram_condition:.4g}; {s.side})")
        if self.losses is not None:
            lines.append(f"k={len(self.losses)}: loss {float(self.losses[-1]):.4g}, gap {float(self.gaps[-1]):.4g}, "
                         f"hull loss >= {self.hull_loss_lower_bound:.4g}")
        if self.bound is not None:
            lines.append(f"bound at k={len(self.bound)}: {float(self.bound[-1]):.4g}; holds at every step: {self.bound_holds}")
        lines += self.notes
        return "\n".join(lines)


def diagnose(features=None, targets=None, *, stats=None, selection=None, k: int | None = None, spectrum: bool = True,
             **select_kwargs) -> Diagnostics:
    """Diagnostics from features (U, y) or Gram statistics, and of a selection on them.

    Parameters
    ----------
    features, targets : (N, M) and (M,), or
    stats : an object with G, b, yy, count (e.g. gfs.stats.GramStats).
    selection : a `gfs.Selection` on this problem; with features, `k` runs `gfs.select(features,
        targets, k, **select_kwargs)` instead. With stats, pass the selection.
    spectrum : compute the Gram spectrum (an N x N or M x M eigen-decomposition).

    Returns
    -------
    Diagnostics

    Examples
    --------
    >>> import torch, gfs
    >>> from gfs.theory import diagnose
    >>> U = torch.rand(50, 200); y = U.mean(0)
    >>> d = diagnose(U, y, k=20, backend="torch")
    >>> d.bound_holds
    True
    """
    _pick(features, stats)
    notes = []
    if stats is not None:
        G, b, yy, M = _stats(stats)
        N = G.shape[0]
        diameter = polytope_diameter(stats=stats)
        init = yy / M if yy is not None else None
        dense = (yy - 2 * float(b.mean()) + float(G.mean())) / M if (yy is not None and b is not None) else None
        spec = gram_spectrum(stats=stats) if spectrum else None
        if selection is None and k is not None:
            raise ValueError("with stats, pass selection= (e.g. gfs.select on the same problem); k alone needs features")
    else:
        U, y = _features(features, targets)
        N, M = U.shape
        diameter = polytope_diameter(U)
        init = initial_loss(y) if y is not None else None
        dense = float(((y - U.mean(0)) ** 2).mean()) if y is not None else None
        spec = gram_spectrum(U) if spectrum else None
        if selection is None and k is not None:
            if y is None:
                raise ValueError("targets are needed to run a selection")
            import gfs

            selection = gfs.select(features, targets, k, **select_kwargs)
    d = Diagnostics(N=N, M=M, diameter=diameter, diameter2=diameter ** 2 / M, initial_loss=init, dense_loss=dense,
                    spectrum=spec, notes=notes)
    if selection is not None:
        d.losses = selection.losses.double()
        d.gaps = selection.gaps.double()
        d.hull_loss_lower_bound = float((d.losses - d.gaps).max())
        d.bound_applies = selection.step == "uniform" and bool(selection.replacement)
        if d.bound_applies:
            ref = dense if dense is not None else float(selection.dense_loss)
            d.bound = greedy_bound(len(d.losses), float(d.losses[0]), ref, d.diameter2)
            slack = 1e-5 * float(max(d.bound.abs().max(), 1e-12)) + 1e-12
            d.bound_holds = bool((d.losses <= d.bound + slack).all())
        else:
            notes.append("the bound covers the uniform rule with replacement only; not drawn for this selection")
    return d


# --------------------------------------------------------------------------------------------
# Appendix C: smallest singular value of the hidden output at random initialisation
# --------------------------------------------------------------------------------------------

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def activation_std(activation: str = "relu") -> float:
    """Standard deviation of act(g), g ~ N(0, 1) (trapezoid rule on [-12, 12]): the entry scale
    of the independent-entries random-matrix prediction sigma_min ~ std * |sqrt(N) - sqrt(M)|."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    x = torch.linspace(-12, 12, 240_001, dtype=torch.float64)
    pdf = torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    v = _ACTIVATIONS[activation](x)
    m = float(torch.trapezoid(pdf * v, x))
    return math.sqrt(max(float(torch.trapezoid(pdf * v * v, x)) - m * m, 0.0))


def hidden_output(M: int, N: int, d: int, *, activation: str = "relu", generator: torch.Generator | None = None) -> torch.Tensor:
    """H = act(X W^T), (M x N): M inputs x_i ~ N(0, I_d) scaled to unit norm, N first-layer
    weights w_j ~ N(0, I_d), so every pre-activation w_j . x_i is N(0, 1) (float64)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    X = torch.randn(M, d, generator=generator, dtype=torch.float64)
    X = X / X.norm(dim=1, keepdim=True)
    W = torch.randn(N, d, generator=generator, dtype=torch.float64)
    return _ACTIVATIONS[activation](X @ W.T)


def loglog_fit(x, y) -> dict:
    """Least squares log y = c + slope log x; returns slope, c (so y ~ e^c x^slope) and R^2."""
    lx, ly = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    A = np.stack([np.ones_like(lx), lx], 1)
    coef, *_ = np.linalg.lstsq(A, ly, rcond=None)
    resid = ly - A @ coef
    ss = float(((ly - ly.mean()) ** 2).sum())
    return {"slope": float(coef[1]), "intercept": float(coef[0]), "r2": 1 - float((resid ** 2).sum()) / ss if ss > 0 else float("nan")}


@dataclass
class SingularValueResult:
    """Table rows (width N, size M, dim d, mean / std of sigma_min and of the condition number over
    repeats, the random-matrix prediction), the log-log fits, and the files written."""

    rows: list
    fits: dict
    finding: str
    seconds: float
    files: dict = field(default_factory=dict)


def singular_value_study(widths=(256, 512, 1024, 2048, 4096), sizes=(32, 64, 128), dims=(8, 32, 128), *,
                         repeats: int = 10, activation: str = "relu", seed: int = 0, out: str | None = None,
                         progress: bool = False, threads: int | None = 1) -> SingularValueResult:
    """The paper's Appendix C: sigma_min(H) of the hidden output H = act(X W^T) (M x N) at random
    Gaussian initialisation (`hidden_output`), for every width N, data-set size M and input
    dimension d, `repeats` draws each (mean and standard deviation), with the condition number
    sigma_max / sigma_min.

    Fits (least squares in log-log): for every (M, d) the exponent of N (the paper: sigma_min
    grows like sqrt(N), exponent 1/2, when N >> M), for every (N, d) the exponent of M, for every
    (N, M) the exponent of d, and one joint fit log sigma_min = c + a log N + b log M + g log d.
    The independent-entries prediction std(act) * (sqrt(N) - sqrt(M)) is tabulated beside it
    (the data points share the weights, so the entries are not independent: a guide, not a law).

    Writes singular_values.csv, singular_values.json and singular_values.png to `out` if given.
    """
    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    std = activation_std(activation)
    grid = [(N, M, d) for d in dims for M in sizes for N in widths]
    rows = []
    try:
        bar = None
        if progress:
            from rich.progress import Progress

            bar = Progress()
            bar.start()
            task = bar.add_task("singular values", total=len(grid))
        for (N, M, d) in grid:
            smin, cond = [], []
            for _ in range(repeats):
                sv = torch.linalg.svdvals(hidden_output(M, N, d, activation=activation, generator=g))
                smin.append(float(sv[-1]))
                cond.append(float(sv[0] / sv[-1]) if sv[-1] > 0 else math.inf)
            rows.append({"width": N, "size": M, "dim": d, "sigma_min_mean": float(np.mean(smin)),
                         "sigma_min_std": float(np.std(smin, ddof=1)) if repeats > 1 else 0.0,
                         "condition_mean": float(np.mean(cond)), "condition_std": float(np.std(cond, ddof=1)) if repeats > 1 else 0.0,
                         "rmt_prediction": std * abs(math.sqrt(N) - math.sqrt(M)), "repeats": repeats})
            if bar is not None:
                bar.update(task, advance=1)
        if bar is not None:
            bar.stop()
    finally:
        torch.set_num_threads(old_threads)
    fits = _singular_value_fits(rows, widths, sizes, dims)
    finding = _singular_value_finding(fits, activation)
    res = SingularValueResult(rows=rows, fits=fits, finding=finding, seconds=time.perf_counter() - t0)
    if out is not None:
        res.files = _write_singular_values(res, out, activation, std)
    return res


def _singular_value_fits(rows, widths, sizes, dims) -> dict:
    table = {(r["width"], r["size"], r["dim"]): r["sigma_min_mean"] for r in rows}
    fits = {"vs_width": [], "vs_size": [], "vs_dim": []}
    if len(widths) > 1:
        for M in sizes:
            for d in dims:
                sig = np.array([table[(N, M, d)] for N in widths])
                f = loglog_fit(widths, sig)
                # the paper's comparison: sigma_min against c (sqrt(N) - sqrt(M)), c by least squares
                x = np.abs(np.sqrt(np.array(widths, dtype=np.float64)) - math.sqrt(M))
                c = float(x @ sig / (x @ x)) if float(x @ x) > 0 else float("nan")
                rel = float(np.max(np.abs(c * x - sig) / sig))
                fits["vs_width"].append({"size": M, "dim": d, **f, "sqrt_scale": c, "sqrt_max_rel_err": rel})
    if len(sizes) > 1:
        for N in widths:
            for d in dims:
                f = loglog_fit(sizes, [table[(N, M, d)] for M in sizes])
                fits["vs_size"].append({"width": N, "dim": d, **f})
    if len(dims) > 1:
        for N in widths:
            for M in sizes:
                f = loglog_fit(dims, [table[(N, M, d)] for d in dims])
                fits["vs_dim"].append({"width": N, "size": M, **f})
    keys = list(table)
    A = np.array([[1.0, math.log(N), math.log(M), math.log(d)] for (N, M, d) in keys])
    ly = np.log(np.array([table[k] for k in keys]))
    free = [0] + [i + 1 for i, v in enumerate((widths, sizes, dims)) if len(v) > 1]
    coef = np.zeros(4)
    sol, *_ = np.linalg.lstsq(A[:, free], ly, rcond=None)
    coef[free] = sol
    resid = ly - A @ coef
    ss = float(((ly - ly.mean()) ** 2).sum())
    fits["joint"] = {"intercept": float(coef[0]), "width_exponent": float(coef[1]), "size_exponent": float(coef[2]),
                     "dim_exponent": float(coef[3]), "r2": 1 - float((resid ** 2).sum()) / ss if ss > 0 else float("nan")}
    return fits


def _range(values) -> str:
    return f"{min(values):.2f} to {max(values):.2f}" if values else "n/a"


def _singular_value_finding(fits, activation) -> str:
    j = fits["joint"]
    lines = [f"sigma_min of act(X W^T) ({activation}), log-log least squares:"]
    if fits["vs_width"]:
        lines.append(f"  exponent of width N (per size and dim): {_range([f['slope'] for f in fits['vs_width']])} "
                     f"(paper: sigma_min ~ sqrt(N), exponent 0.5, for N >> M)")
        lines.append(f"  sigma_min = c (sqrt(N) - sqrt(M)) over the widths, c by least squares per size and dim: "
                     f"c {_range([f['sqrt_scale'] for f in fits['vs_width']])}, largest relative error "
                     f"{max(f['sqrt_max_rel_err'] for f in fits['vs_width']):.1%}")
    if fits["vs_size"]:
        lines.append(f"  exponent of data-set size M (per width and dim): {_range([f['slope'] for f in fits['vs_size']])}")
    if fits["vs_dim"]:
        lines.append(f"  exponent of input dimension d (per width and size): {_range([f['slope'] for f in fits['vs_dim']])}")
    lines.append(f"  joint fit: sigma_min ~ {math.exp(j['intercept']):.3g} N^{j['width_exponent']:.2f} "
                 f"M^{j['size_exponent']:.2f} d^{j['dim_exponent']:.2f} (R^2 {j['r2']:.3f})")
    return "\n".join(lines)


def _write_singular_values(res: SingularValueResult, out: str, activation: str, std: float) -> dict:
    import csv
    import json
    import os

    os.makedirs(out, exist_ok=True)
    files = {"csv": os.path.join(out, "singular_values.csv"), "json": os.path.join(out, "singular_values.json"),
             "figure": os.path.join(out, "singular_values.png")}
    with open(files["csv"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(res.rows[0]))
        w.writeheader()
        w.writerows(res.rows)
    with open(files["json"], "w") as fh:
        json.dump({"activation": activation, "activation_std": std, "rows": res.rows, "fits": res.fits,
                   "finding": res.finding, "seconds": res.seconds}, fh, indent=1)
    plot_singular_values(res.rows, res.fits, files["figure"], activation)
    return files


def plot_singular_values(rows, fits, path: str, activation: str = "relu") -> str:
    """Three panels: sigma_min vs width for each size (middle dim) with the independent-entries
    prediction dashed; sigma_min vs width for each dim (middle size); condition number vs width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["width"] for r in rows})
    sizes = sorted({r["size"] for r in rows})
    dims = sorted({r["dim"] for r in rows})
    d_mid, m_mid = dims[len(dims) // 2], sizes[len(sizes) // 2]
    t = {(r["width"], r["size"], r["dim"]): r for r in rows}
    slope = {(f["size"], f["dim"]): f["slope"] for f in fits.get("vs_width", [])}
    scale = {(f["size"], f["dim"]): f["sqrt_scale"] for f in fits.get("vs_width", [])}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), constrained_layout=True)
    for M in sizes:
        rs = [t[(N, M, d_mid)] for N in widths]
        lab = f"M={M}" + (f" (slope {slope[(M, d_mid)]:.2f})" if (M, d_mid) in slope else "")
        line = axes[0].errorbar(widths, [r["sigma_min_mean"] for r in rs], yerr=[r["sigma_min_std"] for r in rs],
                                marker="o", ms=4, capsize=2, label=lab)
        if (M, d_mid) in scale:
            axes[0].plot(widths, [scale[(M, d_mid)] * abs(math.sqrt(N) - math.sqrt(M)) for N in widths], ls="--",
                         color=line[0].get_color(), lw=1)
    axes[0].set_title(f"sigma_min vs width, d={d_mid} (dashed: fitted c (sqrt N - sqrt M))", fontsize=9)
    for d in dims:
        rs = [t[(N, m_mid, d)] for N in widths]
        lab = f"d={d}" + (f" (slope {slope[(m_mid, d)]:.2f})" if (m_mid, d) in slope else "")
        axes[1].errorbar(widths, [r["sigma_min_mean"] for r in rs], yerr=[r["sigma_min_std"] for r in rs], marker="o",
                         ms=4, capsize=2, label=lab)
    axes[1].set_title(f"sigma_min vs width, M={m_mid}", fontsize=9)
    for M in sizes:
        rs = [t[(N, M, d_mid)] for N in widths]
        axes[2].plot(widths, [r["condition_mean"] for r in rs], marker="o", ms=4, label=f"M={M}")
    axes[2].set_title(f"condition number sigma_max/sigma_min, d={d_mid}", fontsize=9)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(widths, [str(N) for N in widths])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("width N")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("smallest singular value of H")
    fig.suptitle(f"Hidden output H = {activation}(X W^T) at random Gaussian initialisation (x on the unit sphere)", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["polytope_diameter", "initial_loss", "gram_spectrum", "Spectrum", "frank_wolfe_gap", "greedy_bound",
           "Diagnostics", "diagnose", "hidden_output", "activation_std", "loglog_fit", "singular_value_study",
           "SingularValueResult", "plot_singular_values"]

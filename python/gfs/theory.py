"""Diagnostics of a selection problem (the paper's Appendix C study of singular values at random
initialisation is gfs.experiments.singular_values).

Notation (docs/design.md section 1): candidates u_1..u_N in R^M (rows of U), target y in R^M, and
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
from dataclasses import dataclass, field

import torch

from ._validation import as_tensor, check_dtype, check_finite, features_and_targets

_CHUNK_BYTES = 64 << 20


# --------------------------------------------------------------------------------------------
# The problem, from features or from Gram statistics
# --------------------------------------------------------------------------------------------


def _float64(x, name: str) -> torch.Tensor:
    """x checked at the edge (gfs._validation: a floating-point tensor or array, finite, errors
    naming `name`), as a float64 CPU tensor."""
    t = as_tensor(x, name)
    check_dtype(t, name)
    check_finite(t, name)
    return t.to(device="cpu", dtype=torch.float64)


def _features(features, targets=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(U, y) in float64 on the CPU: U (N, M) from features (N, M) or (N, *S), y (M,) or None."""
    if targets is not None:
        U, y, _ = features_and_targets(features, targets)
        return U.to(device="cpu", dtype=torch.float64), y.to(device="cpu", dtype=torch.float64)
    U = _float64(features, "features")
    if U.dim() < 2 or U.shape[0] == 0:
        raise ValueError(f"features must have shape (N, M) or (N, *S) with N >= 1; got {tuple(U.shape)}")
    return U.reshape(U.shape[0], -1), None


def _stats(stats) -> tuple[torch.Tensor, torch.Tensor | None, float | None, int]:
    """(G, b, yy, M) from a GramStats-like object."""
    missing = [a for a in ("G", "count") if not hasattr(stats, a)]
    if missing:
        raise TypeError(
            f"stats needs attributes G (N x N), b (N), yy and count (M); {type(stats).__name__} lacks {missing}"
        )
    G = _float64(stats.G, "stats.G")
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"stats.G must be square (N x N), got {tuple(G.shape)}")
    b = _float64(stats.b, "stats.b").reshape(-1) if getattr(stats, "b", None) is not None else None
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
    y = _float64(targets, "targets").reshape(-1)
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
        return _spectrum_from_eigs(
            eigs.sort(descending=True).values[:r], "candidates (N x N)" if G.shape[0] <= M else "data (from G, top M)"
        )
    U, _ = _features(features)
    N, M = U.shape
    if N <= M:
        return _spectrum_from_eigs(torch.linalg.eigvalsh(U @ U.T), "candidates (N x N)")
    return _spectrum_from_eigs(torch.linalg.eigvalsh(U.T @ U), "data (M x M)")


def frank_wolfe_gap(weights, features=None, targets=None, *, stats=None) -> float:
    """g(z) = max_j <2 (y - z), u_j - z> / M for z = sum_j weights_j u_j: an upper bound on
    f(z) - min over the convex hull of f (weights on the simplex)."""
    _pick(features, stats)
    w = _float64(weights, "weights").reshape(-1)
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
        lines = [
            f"N={self.N} candidates, M={self.M} entries; diameter {self.diameter:.4g} "
            f"(per-entry D^2 {self.diameter2:.4g})"
        ]
        if self.initial_loss is not None:
            lines.append(f"initial loss {self.initial_loss:.4g}, dense loss {self.dense_loss:.4g}")
        if self.spectrum is not None:
            s = self.spectrum
            lines.append(
                f"sigma_min {s.sigma_min:.4g}, sigma_max {s.sigma_max:.4g}, condition {s.condition:.4g} "
                f"(Gram: min eig {s.gram_min_eig:.4g}, condition {s.gram_condition:.4g}; {s.side})"
            )
        if self.losses is not None:
            lines.append(
                f"k={len(self.losses)}: loss {float(self.losses[-1]):.4g}, gap {float(self.gaps[-1]):.4g}, "
                f"hull loss >= {self.hull_loss_lower_bound:.4g}"
            )
        if self.bound is not None:
            lines.append(
                f"bound at k={len(self.bound)}: {float(self.bound[-1]):.4g}; holds at every step: {self.bound_holds}"
            )
        lines += self.notes
        return "\n".join(lines)


def diagnose(
    features=None,
    targets=None,
    *,
    stats=None,
    selection=None,
    k: int | None = None,
    spectrum: bool = True,
    **select_kwargs,
) -> Diagnostics:
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
            raise ValueError(
                "with stats, pass selection= (e.g. gfs.select on the same problem); k alone needs features"
            )
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
    d = Diagnostics(
        N=N,
        M=M,
        diameter=diameter,
        diameter2=diameter**2 / M,
        initial_loss=init,
        dense_loss=dense,
        spectrum=spec,
        notes=notes,
    )
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


__all__ = [
    "polytope_diameter",
    "initial_loss",
    "gram_spectrum",
    "Spectrum",
    "frank_wolfe_gap",
    "greedy_bound",
    "Diagnostics",
    "diagnose",
]

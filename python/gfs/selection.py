"""The one result type of every selection path."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Selection:
    """The result of greedy forward selection.

    Attributes
    ----------
    indices : LongTensor (k,)
        The candidate picked at each step, in order (repeats allowed with replacement).
    support : LongTensor
        The distinct candidates chosen, sorted.
    weights : Tensor (N,), float64
        The subnetwork is sum_j weights[j] * u_j; the weights sum to 1: counts / steps for the
        uniform rule, convex weights for line_search, affine least-squares weights (any sign)
        for refit.
    losses : Tensor (k,), float64
        ||y - z||^2 / M after each step.
    gaps : Tensor (k,), float64
        Frank-Wolfe gap after each step: max_j <2 (y - z), u_j - z> / M, an upper bound on
        loss - (best loss over the convex hull of the candidates).
    dense_loss : float
        Loss of the dense network, the uniform average of all N candidates.
    backend, engine, step, replacement
        How it ran: the backend's name, "stream" or "gram", the step rule, with/without repeats.
    reason : str
        Why this engine and backend ran: the "auto" choices (with the cost model's estimates),
        or "requested".
    seconds : float
        Wall time of the whole call.
    timings : dict
        Seconds per phase ("validate", "dense", "select"; plus "stats", building G, when the
        Gram engine ran from features).
    notes : dict
        Backend facts worth knowing; "gammas": the step size of each step (uniform 1/(t+1),
        line_search the chosen gamma, refit 1 where the pick entered the fit, 0 where it changed
        nothing).
    """

    indices: torch.Tensor
    support: torch.Tensor
    weights: torch.Tensor
    losses: torch.Tensor
    gaps: torch.Tensor
    dense_loss: float
    backend: str
    engine: str
    step: str
    replacement: bool
    reason: str
    seconds: float
    timings: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        """Steps taken (<= the k asked for when eps stopped early)."""
        return int(self.indices.numel())

    @property
    def loss(self) -> float:
        """The final loss."""
        return float(self.losses[-1])

    def output(self, features) -> torch.Tensor:
        """The subnetwork's output sum_j w_j u_j for features of shape (N, ...)."""
        U = torch.as_tensor(features)
        w = self.weights.to(device=U.device, dtype=torch.float64 if U.dtype == torch.float64 else torch.float32)
        return torch.tensordot(w, U.to(w.dtype), dims=1)

    def __repr__(self) -> str:
        return (
            f"Selection(k={self.k}, distinct={self.support.numel()}, loss={self.loss:.6g}, "
            f"dense_loss={self.dense_loss:.6g}, gap={float(self.gaps[-1]):.3g}, backend={self.backend!r}, "
            f"engine={self.engine!r}, step={self.step!r}, seconds={self.seconds:.4g})"
        )

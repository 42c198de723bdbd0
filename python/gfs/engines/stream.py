"""The streaming engine: features in memory, one pass over U per step through a backend."""
from __future__ import annotations

import torch

import gfs_kernels
from gfs_kernels.base import Backend, GreedyResult


def run(backend: Backend, U: torch.Tensor, y: torch.Tensor, k: int, *, step: str, replacement: bool,
        stop_loss: float) -> GreedyResult:
    """Run `step` for at most k steps; U (N, M) contiguous, y (M,) in the accumulation dtype."""
    if step == "uniform":
        return backend.greedy_uniform(U, y, k, replacement, stop_loss)
    raise NotImplementedError(
        f"step={step!r} comes with the Gram engine (issue 4: line search and refit); use step='uniform' for now"
    )


def dense_loss(U: torch.Tensor, y: torch.Tensor) -> float:
    """||y - mean_j u_j||^2 / M: the loss of the dense network (the uniform average)."""
    mean = U.sum(0, dtype=y.dtype).double() / U.shape[0]
    return float(((y.double() - mean) ** 2).mean())


def uniform_weights(indices: torch.Tensor, n: int) -> torch.Tensor:
    """counts / steps: the uniform rule's weights."""
    counts = torch.bincount(indices, minlength=n).double()
    return counts / counts.sum()


__all__ = ["run", "dense_loss", "uniform_weights", "gfs_kernels"]

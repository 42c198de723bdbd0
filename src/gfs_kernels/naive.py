""""naive": the baseline every other backend is measured against.

A Python loop over candidates that evaluates each candidate's loss ||y - (t z + u_j)/(t+1)||^2
with torch operations, one evaluation per candidate per step, as published GFS code does.
(The Frank-Wolfe gap, a certificate rather than part of the selection, is one vectorised
product per step.)
"""
from __future__ import annotations

import torch

from .base import Backend, GreedyResult
from .torch_ref import TorchBackend


class NaiveBackend(Backend):
    name = "naive"
    description = "Python loop over candidates, one loss evaluation each (the baseline)"
    device_types = ("cpu", "cuda")

    _vector = TorchBackend()
    prepare = _vector.prepare
    dots = _vector.dots

    def greedy_uniform(self, U, y, k, replacement, stop_loss):
        N, M = U.shape
        acc = y.dtype
        z = torch.zeros_like(y)
        taken = [False] * N
        picks, losses, gaps = [], [], []
        for t in range(k):
            best, best_j = float("inf"), -1
            for j in range(N):
                if taken[j] and not replacement:
                    continue
                candidate = (t * z + U[j].to(acc)) / (t + 1)
                loss = float(torch.sum((y - candidate) ** 2))
                if loss < best:  # strict: ties keep the lowest index
                    best, best_j = loss, j
            taken[best_j] = True
            z = (t * z + U[best_j].to(acc)) / (t + 1)
            r = y - z
            picks.append(best_j)
            losses.append(float(torch.sum(r.double() ** 2)) / M)
            gaps.append(2.0 * (float(self.dots(U, r).max()) - float(r @ z)) / M)
            if losses[-1] <= stop_loss:
                break
        dev = U.device
        return GreedyResult(
            torch.tensor(picks, dtype=torch.int64, device=dev),
            torch.tensor(losses, dtype=torch.float64, device=dev),
            torch.tensor(gaps, dtype=torch.float64, device=dev),
        )

""" "naive": the baseline every other backend is measured against.

A Python loop over candidates that evaluates each candidate's loss ||y - (t z + u_j)/(t+1)||^2
with torch operations, one evaluation per candidate per step, as published GFS code does (as
(t+1)^2 times it, ||(t+1) y - S - u_j||^2 with S = t z the sum of the picks: no division, so
candidates whose losses tie exactly in exact arithmetic tie in floating point too on data that
are small integers times a power of two, and the lowest index wins).
(The Frank-Wolfe gap, a certificate rather than part of the selection, is one vectorised
product per step.)
"""

from __future__ import annotations

import torch

from .base import Backend, LoopResult
from .torch_ref import TorchBackend


class NaiveBackend(Backend):
    name = "naive"
    description = "Python loop over candidates, one loss evaluation each (the baseline)"
    device_types = ("cpu", "cuda")
    native_uniform = True  # its own loop: the baseline

    _vector = TorchBackend()
    prepare = _vector.prepare
    dots = _vector.dots

    def greedy_uniform(self, U, y, k, replacement, stop_loss):
        N, M = U.shape
        acc = y.dtype
        S = torch.zeros_like(y)
        taken = [False] * N
        picks, losses, gaps = [], [], []
        for t in range(k):
            q = (t + 1) * y - S
            best, best_j = float("inf"), -1
            for j in range(N):
                if taken[j] and not replacement:
                    continue
                loss = float(torch.sum((q - U[j].to(acc)) ** 2))
                if best_j < 0 or loss < best:  # strict: ties keep the lowest index
                    best, best_j = loss, j
            taken[best_j] = True
            S = S + U[best_j].to(acc)
            z = S / (t + 1)
            r = y - z
            picks.append(best_j)
            losses.append(float(torch.sum(r.double() ** 2)) / M)
            gaps.append(2.0 * (float(self.dots(U, r).max()) - float(r @ z)) / M)
            if losses[-1] <= stop_loss:
                break
        dev = U.device
        return LoopResult.uniform(
            torch.tensor(picks, dtype=torch.int64, device=dev),
            torch.tensor(losses, dtype=torch.float64, device=dev),
            torch.tensor(gaps, dtype=torch.float64, device=dev),
            N,
        )

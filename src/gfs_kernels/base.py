"""The one small interface every backend implements.

A backend computes greedy forward selection's streaming step on a features matrix U (N x M,
row j = candidate u_j) and a target y (M). It never knows about models or validation: inputs
arrive checked, contiguous, on the backend's device, U in a storage dtype the backend declared
(float32/float64/float16/bfloat16) and y in the accumulation dtype (float64 for float64 U,
else float32).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 storage accumulates in float64; every other storage dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class GreedyResult:
    """What a backend's greedy loop returns (all on the backend's device).

    indices: int64 (s,), the pick of each step, s <= k (fewer when the stop loss was reached).
    losses: float64 (s,), ||y - z_{t+1}||^2 / M after each step.
    gaps: float64 (s,), the Frank-Wolfe gap max_j <2 (y - z), u_j - z> / M at each z_{t+1}.
    notes: backend-specific facts worth reporting (e.g. "streamed from pinned host memory").
    """

    indices: torch.Tensor
    losses: torch.Tensor
    gaps: torch.Tensor
    notes: dict = field(default_factory=dict)


class Backend:
    """Base class. Subclasses set the class attributes and override the methods they accelerate.

    `prepare` and `dots` are the two streaming primitives (one pass over U each); the engines
    build every step rule from them. `greedy_uniform` is the whole uniform-rule loop; the default
    here drives it from Python with `prepare`/`dots`, and compiled backends replace it with one
    native call.
    """

    name: str = ""
    description: str = ""
    device_types: tuple[str, ...] = ("cpu",)
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

    def unavailable_reason(self) -> str | None:
        """None when usable here, else a one-line reason (e.g. "no CUDA device")."""
        return None

    def supports(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """None when this backend can run on (device, dtype), else a one-line reason."""
        reason = self.unavailable_reason()
        if reason:
            return reason
        if device.type not in self.device_types:
            return f"runs on {'/'.join(self.device_types)}, not {device.type}"
        if dtype not in self.dtypes:
            return f"does not take {dtype}"
        return None

    # -- streaming primitives -------------------------------------------------------------
    def prepare(self, U: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(||u_j||^2, <y, u_j>) for every j, in the accumulation dtype."""
        raise NotImplementedError

    def dots(self, U: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """e = U r in the accumulation dtype (r has the accumulation dtype)."""
        raise NotImplementedError

    # -- the uniform rule -----------------------------------------------------------------
    def greedy_uniform(
        self, U: torch.Tensor, y: torch.Tensor, k: int, replacement: bool, stop_loss: float
    ) -> GreedyResult:
        return uniform_loop(self, U, y, k, replacement, stop_loss)


def uniform_loop(
    backend: Backend, U: torch.Tensor, y: torch.Tensor, k: int, replacement: bool, stop_loss: float
) -> GreedyResult:
    """The uniform rule driven from Python over a backend's `prepare` and `dots`.

    With r = y - z_t and a_j = ||u_j||^2 - 2 <y, u_j>, the step-t loss of candidate j is
    (||q||^2 + a_j - 2 t <r, u_j>) / (t+1)^2 for a q that does not depend on j, so the pick is
    argmin_j a_j - 2 t e_j with e = U r (DESIGN section 2). z and r are kept in float64; the
    reported loss is the exact ||r_{t+1}||^2 / M.
    """
    N, M = U.shape
    acc = y.dtype
    norms, b = backend.prepare(U, y)
    a = norms.double() - 2.0 * b.double()
    y64 = y.double()
    z = torch.zeros_like(y64)
    r = y64.clone()
    e = b
    taken = torch.zeros(N, dtype=torch.bool, device=U.device)
    picks, losses, gaps = [], [], []
    for t in range(k):
        if t > 0:
            e = backend.dots(U, r.to(acc))
            gaps.append(_gap(e, r, z, M))
        score = a - (2.0 * t) * e.double()
        if not replacement:
            score = score.masked_fill(taken, float("inf"))
        j = int(torch.argmin(score))  # first minimum: ties go to the lowest index
        taken[j] = True
        z = (t * z + U[j].double()) / (t + 1)
        r = y64 - z
        loss = float(r @ r) / M
        picks.append(j)
        losses.append(loss)
        if loss <= stop_loss:
            break
    gaps.append(_gap(backend.dots(U, r.to(acc)), r, z, M))
    dev = U.device
    return GreedyResult(
        torch.tensor(picks, dtype=torch.int64, device=dev),
        torch.tensor(losses, dtype=torch.float64, device=dev),
        torch.tensor(gaps, dtype=torch.float64, device=dev),
    )


def _gap(e: torch.Tensor, r: torch.Tensor, z: torch.Tensor, M: int) -> float:
    """Frank-Wolfe gap max_j <2 r, u_j - z> / M from e = U r (r = y - z)."""
    return 2.0 * (float(e.double().max()) - float(r @ z)) / M

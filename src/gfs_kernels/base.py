"""The one small interface every backend implements, and the one result type of a loop.

A backend runs greedy forward selection's primitives on one kind of device. It never knows
about models or validation: inputs arrive checked, contiguous, on the backend's device, U in a
storage dtype the backend declared (float32/float64/float16/bfloat16) and y in the
accumulation dtype (float64 for float64 U, else float32).

Each backend declares what it runs (`engines`: for the streaming and the Gram engine, the step
rules; `device_types`; `dtypes`), so that the one planner (gfs.engines.plan) can choose among
them from data. The step rules themselves live in gfs.engines (one module per rule); a backend
supplies the primitives they are built from and, where it has them, whole native loops:

- streaming primitives `prepare` and `dots` (one pass over U each), every streaming backend;
- `greedy_uniform`: the whole uniform-rule loop in one call, where `native_uniform` is True
  (otherwise the engine drives the rule's Python loop over `prepare` / `dots`);
- `gram_loop`: a whole Gram-engine loop from the statistics, for the rules in
  `native_gram` (otherwise the engine runs the rule's Python loop over rows of G).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STEPS = ("uniform", "line_search", "refit")
ENGINES = ("stream", "gram")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 storage accumulates in float64; every other storage dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class LoopResult:
    """What every selection loop returns (on the loop's device), whatever the engine and rule.

    indices: int64 (s,), the pick of each step, s <= k (fewer when the stop loss was reached).
    losses: float64 (s,), ||y - z_{t+1}||^2 / M after each step.
    gaps: float64 (s,), the Frank-Wolfe gap max_j <2 (y - z), u_j - z> / M at each z_{t+1}.
    gammas: float64 (s,), the step size of each step (uniform 1/(t+1); line_search the chosen
        gamma; refit 1 where the pick entered the fit, 0 where it changed nothing).
    weights: float64 (N,), the final weights w (the subnetwork is sum_j w_j u_j; they sum to 1).
    notes: backend-specific facts worth reporting (e.g. "streamed from pinned host memory").
    """

    indices: torch.Tensor
    losses: torch.Tensor
    gaps: torch.Tensor
    gammas: torch.Tensor
    weights: torch.Tensor
    notes: dict = field(default_factory=dict)

    @classmethod
    def uniform(cls, indices, losses, gaps, n: int, notes: dict | None = None) -> LoopResult:
        """The result of a uniform-rule loop that returned only picks, losses and gaps."""
        s = indices.numel()
        gammas = 1.0 / torch.arange(1, s + 1, dtype=torch.float64, device=indices.device)
        return cls(indices, losses, gaps, gammas, uniform_weights(indices, n), dict(notes or {}))


def uniform_weights(indices: torch.Tensor, n: int) -> torch.Tensor:
    """counts / steps: the uniform rule's weights."""
    counts = torch.bincount(indices, minlength=n).double()
    return counts / max(1, indices.numel())


class Backend:
    """Base class. Subclasses set the class attributes and override the methods they have."""

    name: str = ""
    description: str = ""
    device_types: tuple[str, ...] = ("cpu",)
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    # engine -> the step rules this backend runs there (the streaming rules are built from
    # prepare / dots, so a streaming backend runs all three)
    engines: dict[str, tuple[str, ...]] = {"stream": STEPS}
    native_uniform = False  # greedy_uniform is a whole loop of the backend's own
    native_gram: tuple[str, ...] = ()  # rules whose whole Gram loop the backend runs (gram_loop)

    def unavailable_reason(self) -> str | None:
        """None when usable here, else a one-line reason (e.g. "no CUDA device")."""
        return None

    def supports(
        self, device: torch.device, dtype: torch.dtype, engine: str = "stream", step: str = "uniform"
    ) -> str | None:
        """None when this backend can run `step` on `engine` on (device, dtype), else a one-line
        reason. (The Gram engine's statistics are always float64: dtype does not matter there.)"""
        reason = self.unavailable_reason()
        if reason:
            return reason
        if device.type not in self.device_types:
            return f"runs on {'/'.join(self.device_types)}, not {device.type}"
        if engine not in self.engines:
            return f"has no {engine} engine"
        if step not in self.engines[engine]:
            return f"has the {'/'.join(self.engines[engine])} rule(s) only on the {engine} engine, not {step!r}"
        if engine == "stream" and dtype not in self.dtypes:
            return f"does not take {dtype}"
        return None

    # -- streaming primitives -------------------------------------------------------------
    def prepare(self, U: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(||u_j||^2, <y, u_j>) for every j, in the accumulation dtype."""
        raise NotImplementedError

    def dots(self, U: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """e = U r in the accumulation dtype (r has the accumulation dtype)."""
        raise NotImplementedError

    # -- whole native loops (where the backend has them) ----------------------------------
    def greedy_uniform(
        self, U: torch.Tensor, y: torch.Tensor, k: int, replacement: bool, stop_loss: float
    ) -> LoopResult:
        """The uniform rule's whole loop (when `native_uniform`)."""
        raise NotImplementedError(f"backend {self.name!r} has no native uniform loop")

    def gram_loop(
        self,
        G: torch.Tensor,
        b: torch.Tensor,
        yy: float,
        count: int,
        k: int,
        step: str,
        replacement: bool,
        stop_loss: float,
        tol: float,
    ) -> LoopResult:
        """A whole Gram-engine loop (for the rules in `native_gram`)."""
        raise NotImplementedError(f"backend {self.name!r} has no native Gram loop")

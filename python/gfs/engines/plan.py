"""The one planner: which engine, which backend, where it runs, and why.

Every caller that runs a selection (gfs.select, gfs.distributed, gfs.pruning, the CLI) asks
here; nothing else chooses. The choice is made from data: the backends' declared capabilities
and preference order (gfs_kernels' registry) and one cost model (gfs.engines.cost, for
streaming vs Gram and for whether features fit in device memory). Each decision carries a
one-line `reason` that ends up in Selection.reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import gfs_kernels
from gfs_kernels.base import Backend

from . import cost

ENGINES = ("auto", "stream", "gram")


@dataclass(frozen=True)
class Plan:
    """How a selection runs.

    engine: "stream" or "gram"; backend: the gfs_kernels backend; device: where the backend runs
    when the features live elsewhere (a GPU backend given host memory), else None; placement:
    "resident" (the features are where the backend runs), "upload" (moved there once) or
    "stream" (streamed from host memory every step); reason: why, in one line.
    """

    engine: str
    backend: Backend
    reason: str
    device: torch.device | None = None
    placement: str = "resident"


def backend_for(
    engine: str, device: torch.device, dtype: torch.dtype, step: str = "uniform", backend: str = "auto"
) -> tuple[Backend, str]:
    """(backend, reason) for `engine` on (device, dtype, step): the requested one, checked, or the
    first usable one in the registry's preference order, with why the faster ones were skipped."""
    device = torch.device(device)
    if backend != "auto":
        chosen = gfs_kernels.get(backend)  # ValueError naming the known backends
        why_not = chosen.supports(device, dtype, engine, step)
        if engine == "gram" and "gram" not in chosen.engines:
            known = [n for n in gfs_kernels.names() if "gram" in gfs_kernels.get(n).engines]
            raise ValueError(
                f"the Gram engine has no backend {backend!r}; choose one of {['auto', *known]} "
                f"(or engine='stream' to use the streaming backend {backend!r})"
            )
        if why_not:
            what = "Gram backend" if engine == "gram" else "backend"
            raise ValueError(
                f"{what} {backend!r} cannot run here: {why_not}; use backend='auto'"
                + ("" if engine == "gram" else f" or another of {gfs_kernels.names()}")
            )
        return chosen, "requested"
    skipped: list[str] = []
    for name in gfs_kernels.PREFERENCE[engine].get(device.type, ["torch"]):
        candidate = gfs_kernels.get(name)
        why_not = candidate.supports(device, dtype, engine, step)
        if why_not is None:
            what = (
                f"{name} is the fastest usable Gram backend for {device.type}/{step}"
                if engine == "gram"
                else (
                    f"auto: {name} is the fastest usable backend for {device.type}/{str(dtype).removeprefix('torch.')}"
                )
            )
            return candidate, what + (" (skipped " + "; ".join(skipped) + ")" if skipped else "")
        skipped.append(f"{name}: {why_not}")
    raise RuntimeError(f"no {engine} backend can run here: " + "; ".join(skipped))


def plan(
    N: int,
    M: int,
    k: int,
    dtype: torch.dtype,
    step: str,
    device: torch.device,
    *,
    engine: str = "auto",
    backend: str = "auto",
    from_stats: bool = False,
) -> Plan:
    """The plan of gfs.select for features (N, M) of `dtype` on `device` (or statistics of N
    candidates, `from_stats`), k steps of `step`, with the caller's engine and backend names."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")
    device = torch.device(device)
    if from_stats:
        if engine == "stream":
            raise ValueError(
                "engine='stream' needs the features matrix, and a GramStats holds only statistics; "
                "use engine='gram' (or 'auto'), or pass the features and targets"
            )
        why = (
            "Gram engine: statistics given (the only engine that needs no features)"
            if engine == "auto"
            else ("gram engine requested")
        )
        chosen, reason = backend_for("gram", device, torch.float64, step, backend)
        return Plan("gram", chosen, f"{why}; backend: {reason}")
    if engine == "auto":
        if backend != "auto":
            gfs_kernels.get(backend)  # an unknown name is an error before anything else
            engine, why = (
                "stream",
                f"streaming engine: backend {backend!r} requested (engine='gram' runs the Gram engine)",
            )
        else:
            engine, why = cost.faster_engine(N, M, k, dtype, step, device, backend_for("stream", device, dtype)[0])
    else:
        why = f"{engine} engine requested"
    if engine == "gram":
        chosen, reason = backend_for("gram", device, torch.float64, step, backend)
        return Plan("gram", chosen, f"{why}; backend: {reason}")
    return _stream_plan(N, M, dtype, step, device, backend, why)


def _stream_plan(N, M, dtype, step, device, backend, why) -> Plan:
    """The streaming engine's backend and placement: a GPU backend named for host features runs
    on the current GPU, the features uploaded once when they fit, else streamed every step."""
    if backend != "auto" and device.type == "cpu" and torch.cuda.is_available():
        named = gfs_kernels.get(backend)
        if "cuda" in named.device_types and named.supports(device, dtype, "stream", step):
            gpu = torch.device("cuda", torch.cuda.current_device())
            chosen, reason = backend_for("stream", gpu, dtype, step, backend)
            placement = "upload" if cost.fits_on_device(N, M, dtype, gpu) else "stream"
            if placement == "stream" and step != "uniform":
                raise ValueError(
                    f"features ({N * M * torch.finfo(dtype).bits / 8 / 2**30:.2f} GiB in host memory) do not fit in "
                    f"the free memory of {gpu}, and only the uniform rule streams them from the host; use "
                    "step='uniform', the Gram engine (engine='gram'), or the cpu backend"
                )
            return Plan("stream", chosen, f"{why}; backend: {reason}", gpu, placement)
    chosen, reason = backend_for("stream", device, dtype, step, backend)
    return Plan("stream", chosen, f"{why}; backend: {reason}")


def gram_runs(device: torch.device, step: str, backend: str) -> bool:
    """Whether the Gram engine can run `step` with the named backend ("auto": always) here."""
    if backend == "auto":
        return True
    chosen = gfs_kernels.get(backend)
    return chosen.supports(torch.device(device), torch.float64, "gram", step) is None

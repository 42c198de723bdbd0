"""gfs_kernels: the backends behind gfs, chosen by a registry.

Each backend implements `gfs_kernels.base.Backend`. The registry maps a name to an instance;
`choose` picks, for a device and dtype, the first usable backend in the preference order and
says why the others were skipped. The API layer (package `gfs`) never knows which kernel ran.
"""
from __future__ import annotations

import torch

from .base import Backend, GreedyResult, accumulation_dtype
from .cpu import CpuBackend
from .cuda_backend import CudaBackend
from .naive import NaiveBackend
from .torch_ref import TorchBackend
from .triton_backend import TritonBackend

_REGISTRY: dict[str, Backend] = {}

# Fastest first, per device type. "naive" is never chosen automatically: it is the baseline.
PREFERENCE: dict[str, list[str]] = {
    "cpu": ["cpu", "torch"],
    "cuda": ["cuda", "triton", "torch"],
}


def register(backend: Backend) -> Backend:
    """Add a backend under its name (replacing any of the same name)."""
    _REGISTRY[backend.name] = backend
    return backend


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {['auto', *_REGISTRY]}") from None


def availability(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, str | None]:
    """For each registered backend: None if it can run on (device, dtype), else why not."""
    device = torch.device(device)
    return {name: b.supports(device, dtype) for name, b in _REGISTRY.items()}


def choose(device: torch.device, dtype: torch.dtype) -> tuple[Backend, str]:
    """The first usable backend in PREFERENCE for this device, and a one-line reason."""
    skipped = []
    for name in PREFERENCE.get(device.type, ["torch"]):
        backend = _REGISTRY.get(name)
        if backend is None:
            skipped.append(f"{name}: not registered")
            continue
        why_not = backend.supports(device, dtype)
        if why_not is None:
            reason = f"auto: {name} is the fastest usable backend for {device.type}/{str(dtype).removeprefix('torch.')}"
            if skipped:
                reason += " (skipped " + "; ".join(skipped) + ")"
            return backend, reason
        skipped.append(f"{name}: {why_not}")
    raise RuntimeError("no backend can run here: " + "; ".join(skipped))


for _backend in (NaiveBackend(), TorchBackend(), CpuBackend(), TritonBackend(), CudaBackend()):
    register(_backend)

__all__ = ["Backend", "GreedyResult", "accumulation_dtype", "register", "names", "get", "availability", "choose", "PREFERENCE"]

"""gfs_kernels: every backend of both engines, in ONE registry.

Each backend implements `gfs_kernels.base.Backend` and declares what it runs: for the streaming
and the Gram engine, the step rules (`engines`), its devices and dtypes, and which whole loops
are native. The registry maps a name to an instance and holds the preference order per engine
and device type (data, not code paths); gfs.engines.plan chooses from it. The API layer
(package `gfs`) never knows which kernel ran.

    name      streaming engine                       Gram engine
    naive     its own Python loop (the baseline)     -
    torch     row-wise torch products, any device    the engines' torch loops, any device
    cpu       C++ (OpenMP, AVX2), native loop        C++ native loop, every rule
    triton    Triton kernels, device-resident loop   one persistent program, uniform rule (GPU)
    cuda      CUDA C++, native loop                  -
"""

from __future__ import annotations

import torch

from .base import Backend, LoopResult, accumulation_dtype
from .cpu import CpuBackend
from .cuda_backend import CudaBackend
from .naive import NaiveBackend
from .torch_ref import TorchBackend
from .triton_backend import TritonBackend

_REGISTRY: dict[str, Backend] = {}

# Fastest first, per engine and device type. "naive" is never chosen automatically: it is the
# baseline.
PREFERENCE: dict[str, dict[str, list[str]]] = {
    "stream": {"cpu": ["cpu", "torch"], "cuda": ["cuda", "triton", "torch"]},
    "gram": {"cpu": ["cpu", "torch"], "cuda": ["triton", "torch"]},
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


def availability(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    engine: str = "stream",
    step: str = "uniform",
) -> dict[str, str | None]:
    """For each registered backend: None if it can run `step` on `engine` on (device, dtype),
    else why not."""
    device = torch.device(device)
    return {name: b.supports(device, dtype, engine, step) for name, b in _REGISTRY.items()}


for _backend in (NaiveBackend(), TorchBackend(), CpuBackend(), TritonBackend(), CudaBackend()):
    register(_backend)

__all__ = ["Backend", "LoopResult", "accumulation_dtype", "register", "names", "get", "availability", "PREFERENCE"]

"""The cost model behind engine="auto": streaming or Gram, from (N, M, k, dtype, step, memory).

Estimated seconds, with machine rates measured once per process and device (`calibrate`, about
0.1 s; cached):

    stream  = prepare + k * (N M itemsize / bandwidth + per_step)
              (+ refit: k^2 M / 2 flops rebuilding z, and k^2 N / 2 for its projections)
    gram    = build + per_call + k * N * per_element(step)
              build = N (N + 512) M / 2 * 2 flops / gemm_rate(product dtype)   (lower block triangle)
              (+ refit: k^2 N / 2 for its projections)

where `bandwidth` is the measured rate of the streaming backend's `dots` pass, `per_step` its
fixed per-step cost (Python and the O(N + M) work around the pass), `gemm_rate` the measured
rate of GramStats' block product, `per_element` the native Gram loop's cost per candidate and
step. The Gram engine is ruled out when G (8 N^2 bytes, plus 8 N k for refit) would take more
than half the free memory of the device. When both estimates are under 2 ms the streaming
engine is kept (nothing to win; it never allocates N x N and keeps z exactly).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

_SMALL = 2e-3  # seconds: below this for both engines, stay with streaming
_CACHE: dict[tuple, "Rates"] = {}


@dataclass
class Rates:
    """Measured rates of one device (and storage dtype for the streaming pass)."""

    bandwidth: float  # bytes / s of the streaming backend's dots pass
    per_step: float  # s, fixed cost of a streaming step around the pass
    gemm: float  # "flops" / s of GramStats' block product in the product dtype (N (N+512) m per call)
    per_element: float  # s per candidate per step of the Gram loop
    flops: float  # flops / s of float64 vector work (refit projections)


def _best_of(fn, repeat=3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def calibrate(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, backend=None) -> Rates:
    """Measure (once per process, device, dtype and streaming backend; about 0.1 s) the rates of
    the cost model."""
    import gfs_kernels
    from gfs.stats import _gram_add

    from . import gram

    device = torch.device(device)
    if backend is None:
        backend, _ = gfs_kernels.choose(device, dtype)
    key = (str(device), dtype, backend.name)
    if key in _CACHE:
        return _CACHE[key]
    g = torch.Generator(device=device).manual_seed(0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # the streaming pass: one dots over a 64 MB matrix of this dtype (larger than a CPU's L3)
    rows = (64 << 20) // (1024 * (torch.finfo(dtype).bits // 8))
    U = torch.full((rows, 1024), 0.5, device=device, dtype=dtype)
    r = torch.rand(1024, generator=g, device=device).to(acc)
    bandwidth = U.numel() * U.element_size() / _best_of(lambda: backend.dots(U, r))
    # fixed per-step cost: a small uniform run, minus its passes
    Us, ys, steps = U[:64, :64].contiguous(), r[:64].contiguous(), 20
    t_small = _best_of(lambda: backend.greedy_uniform(Us, ys, steps, True, -1.0), repeat=2)
    per_step = max(1e-7, t_small / steps - Us.numel() * Us.element_size() / bandwidth)
    # the Gram build: GramStats' block product at a representative size
    gkey = (str(device), acc)
    if gkey not in _GEMM:
        n, m = (1024, 1024) if acc == torch.float32 else (1024, 512)
        A = torch.rand(n, m, generator=g, device=device, dtype=acc)
        G = torch.zeros(n, n, dtype=torch.float64, device=device)
        _GEMM[gkey] = n * (n + 512) * m / _best_of(lambda: _gram_add(G, A), repeat=2)
    # the Gram loop, per candidate per step
    if str(device) not in _LOOP:
        n, ksteps = 2048, 128
        A = torch.rand(n, 64, generator=g, device=device, dtype=torch.float64)
        G = A @ A.T
        bb = torch.rand(n, generator=g, device=device, dtype=torch.float64)
        name, _ = gram.choose(device, "uniform")
        t = _best_of(lambda: gram.run(G, bb, 1e3, 64, ksteps, step="uniform", replacement=True, stop_loss=-1.0,
                                      tol=1e-9, backend=name), repeat=2)
        P = torch.rand(64, 1 << 14, generator=g, device=device, dtype=torch.float64)
        l = torch.rand(64, generator=g, device=device, dtype=torch.float64)
        _LOOP[str(device)] = (t / (ksteps * n), 2 * P.numel() / _best_of(lambda: l @ P))
    per_element, flops = _LOOP[str(device)]
    out = Rates(bandwidth, per_step, _GEMM[gkey], per_element, flops)
    _CACHE[key] = out
    return out


_GEMM: dict[tuple, float] = {}
_LOOP: dict[str, tuple[float, float]] = {}


def free_memory(device: torch.device) -> float:
    """Bytes free on the device (MemAvailable on CPU)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


@dataclass
class Estimate:
    stream: float
    gram: float
    gram_bytes: float
    free_bytes: float


def estimate(N: int, M: int, k: int, dtype: torch.dtype, step: str, device: torch.device, backend=None,
             rates: Rates | None = None) -> Estimate:
    """Estimated seconds of each engine (features given), and the Gram engine's memory."""
    R = rates or calibrate(device, dtype, backend)
    item = torch.finfo(dtype).bits // 8
    pass_s = N * M * item / R.bandwidth
    kk = min(k, N)
    stream = pass_s + k * (pass_s + R.per_step)  # prepare + k passes
    build = N * (N + 512) * M / R.gemm
    loop = k * N * R.per_element
    gram = build + loop
    gram_bytes = 8.0 * N * N
    if step == "refit":
        proj = kk * kk * N / R.flops  # O(N |set|) projections per step
        stream += proj + kk * kk * M / R.flops  # + rebuilding z for the exact loss
        gram += proj
        gram_bytes += 8.0 * N * kk
    elif step == "line_search":
        stream += k * 4 * M * 8 / R.bandwidth  # z, r updates in float64
    return Estimate(stream, gram, gram_bytes, free_memory(device))


def choose(N: int, M: int, k: int, dtype: torch.dtype, step: str, device: torch.device, backend=None) -> tuple[str, str]:
    """("stream" | "gram", reason) for features of shape (N, M)."""
    est = estimate(N, M, k, dtype, step, device, backend)
    shape = f"N={N}, M={M}, k={k}, {str(dtype).removeprefix('torch.')}, {step}"
    times = f"estimated {est.gram:.3g} s Gram vs {est.stream:.3g} s streaming"
    if est.gram_bytes > 0.5 * est.free_bytes:
        return "stream", (f"auto: streaming engine, the N x N statistics ({est.gram_bytes / 2**30:.3g} GiB) "
                          f"exceed half the free memory ({est.free_bytes / 2**30:.3g} GiB); {shape}")
    if est.gram < est.stream and est.stream >= _SMALL:
        return "gram", f"auto: Gram engine, {times}; {shape}"
    why = "" if est.gram >= est.stream else " (both under 2 ms)"
    return "stream", f"auto: streaming engine{why}, {times}; {shape}"


__all__ = ["Rates", "calibrate", "estimate", "choose", "free_memory", "Estimate"]

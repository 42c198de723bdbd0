"""The cost model behind engine="auto": streaming or Gram, from (N, M, k, dtype, step, memory).

Estimated seconds, with machine rates measured once per process and device (`calibrate`, about
0.1 s; cached):

    stream  = 2 passes (dense loss, prepare) + k * (pass + per_step),  pass = N M itemsize / bandwidth
              (+ refit: k^2 M flops rebuilding z, and k^2 N for its projections)
    gram    = build_flops(N, M) / gemm_rate(product dtype) + 4 sweeps of 8 N^2 bytes
              + k * N * per_element   (+ refit: k^2 N for its projections)

where `bandwidth` is the measured rate of the streaming backend's `dots` pass, `per_step` its
fixed per-step cost (Python and the O(N + M) work around the pass), `gemm_rate` the measured
rate of GramStats' block product, `per_element` the native Gram loop's cost per candidate and
step. The Gram engine is ruled out when G (8 N^2 bytes, plus 8 N k for refit) would take more
than half the free memory of the device. When both estimates are under 2 ms the streaming
engine is kept (nothing to win; it never allocates N x N and keeps z exactly). Rates are
measured only when the choice is close: with the built-in DEFAULT rates, an engine estimated 4x
faster than the other wins without a measurement.
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
    gemm: float  # flops / s of GramStats' product in the product dtype (gfs.stats.build_flops)
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
    from gfs.stats import _gram_add, build_flops

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
    bandwidth = U.numel() * U.element_size() / _best_of(lambda: backend.dots(U, r), repeat=5)
    # fixed per-step cost: a small uniform run, minus its passes
    Us, ys, steps = U[:64, :64].contiguous(), r[:64].contiguous(), 20
    t_small = _best_of(lambda: backend.greedy_uniform(Us, ys, steps, True, -1.0), repeat=5)
    per_step = max(1e-7, t_small / steps - Us.numel() * Us.element_size() / bandwidth)
    # the Gram build: GramStats' block product at a representative size
    gkey = (str(device), acc)
    if gkey not in _GEMM:
        n, m = (2048, 512) if acc == torch.float32 else (2048, 256)  # the blocked path, ~3 (1.6) GFLOP
        A = torch.rand(n, m, generator=g, device=device, dtype=acc)
        G = torch.zeros(n, n, dtype=torch.float64, device=device)
        _GEMM[gkey] = build_flops(n, m) / _best_of(lambda: _gram_add(G, A), repeat=3)
    # the Gram loop, per candidate per step
    if str(device) not in _LOOP:
        n, ksteps = 2048, 128
        A = torch.rand(n, 64, generator=g, device=device, dtype=torch.float64)
        G = A @ A.T
        bb = torch.rand(n, generator=g, device=device, dtype=torch.float64)
        name, _ = gram.choose(device, "uniform")
        t = _best_of(lambda: gram.run(G, bb, 1e3, 64, ksteps, step="uniform", replacement=True, stop_loss=-1.0,
                                      tol=1e-9, backend=name), repeat=5)
        P = torch.rand(64, 1 << 14, generator=g, device=device, dtype=torch.float64)
        l = torch.rand(64, generator=g, device=device, dtype=torch.float64)
        _LOOP[str(device)] = (t / (ksteps * n), 2 * P.numel() / _best_of(lambda: l @ P, repeat=5))
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
    """Estimated seconds of each engine (features given), and the Gram engine's memory; `rates`
    default to this machine's measured ones (`calibrate`)."""
    from gfs.stats import build_flops

    R = rates or calibrate(device, dtype, backend)
    item = torch.finfo(dtype).bits // 8
    pass_s = N * M * item / R.bandwidth
    kk = min(k, N)
    # streaming: the dense loss and `prepare` (a pass each), then k passes and their fixed costs
    # (line_search and refit do more small operations per step than the uniform loop measured)
    step_factor = {"uniform": 1.0, "line_search": 1.5, "refit": 4.0}[step]
    stream = 2 * pass_s + k * (pass_s + step_factor * R.per_step)
    # Gram: the product, a few O(N^2) float64 sweeps (zeroing, symmetrising, the dense loss), the loop
    loop_factor = {"uniform": 1.0, "line_search": 3.5, "refit": 3.5}[step]
    gram = build_flops(N, M) / R.gemm + 4 * 8.0 * N * N / R.bandwidth + loop_factor * k * N * R.per_element
    gram_bytes = 8.0 * N * N
    if step == "refit":
        proj = kk * kk * N / R.flops  # O(N |set|) projections per step
        stream += proj + kk * kk * M / R.flops  # + rebuilding z for the exact loss
        gram += proj
        gram_bytes += 8.0 * N * kk
    elif step == "line_search":
        stream += k * 4 * M * 8 / R.bandwidth  # z, r updates in float64
    return Estimate(stream, gram, gram_bytes, free_memory(device))


# Rough rates of a small CPU, used to decide without measuring when the answer is clear.
DEFAULT = Rates(bandwidth=10e9, per_step=80e-6, gemm=30e9, per_element=2e-9, flops=5e9)
_CLEAR = 4.0  # an estimate this many times the other needs no measurement


def choose(N: int, M: int, k: int, dtype: torch.dtype, step: str, device: torch.device, backend=None) -> tuple[str, str]:
    """("stream" | "gram", reason) for features of shape (N, M). Decides from default rates when
    the answer is clear (one engine estimated >= 4x faster, or both under 2 ms) and measures the
    machine (`calibrate`, once per process) only when it is close."""
    import gfs_kernels

    device = torch.device(device)
    if backend is None:
        backend, _ = gfs_kernels.choose(device, dtype)
    measured = _CACHE.get((str(device), dtype, backend.name))
    est = estimate(N, M, k, dtype, step, device, backend, rates=measured or DEFAULT)
    source = "measured rates" if measured else "default rates"
    clear = max(est.stream, est.gram) < _SMALL or max(est.stream, est.gram) > _CLEAR * min(est.stream, est.gram)
    if measured is None and not clear:
        est = estimate(N, M, k, dtype, step, device, backend, rates=calibrate(device, dtype, backend))
        source = "measured rates"
    shape = f"N={N}, M={M}, k={k}, {str(dtype).removeprefix('torch.')}, {step}"
    times = f"estimated {est.gram:.3g} s Gram vs {est.stream:.3g} s streaming ({source})"
    if est.gram_bytes > 0.5 * est.free_bytes:
        return "stream", (f"auto: streaming engine, the N x N statistics ({est.gram_bytes / 2**30:.3g} GiB) "
                          f"exceed half the free memory ({est.free_bytes / 2**30:.3g} GiB); {shape}")
    if est.gram < est.stream and est.stream >= _SMALL:
        return "gram", f"auto: Gram engine, {times}; {shape}"
    why = "" if est.gram >= est.stream else " (both under 2 ms)"
    return "stream", f"auto: streaming engine{why}, {times}; {shape}"


__all__ = ["Rates", "calibrate", "estimate", "choose", "free_memory", "Estimate", "DEFAULT"]

"""The cost model behind engine="auto": streaming or Gram, from (N, M, k, dtype, step, memory).

Estimated seconds, with machine rates measured once per process and device (`calibrate`, a few
tenths of a second, cached; only when the choice is close, see `choose`):

    stream = fixed_stream + 2 passes (dense loss, prepare) + k * (pass + per_step)
             pass = N M itemsize / bandwidth
             (line_search / refit: more small operations per step; refit also k^2 (N + M) flops
             for its projections and for rebuilding z)
    gram   = fixed_gram + gram.build_flops(N, M) / gemm_rate(N)                 the product
             + N^2 * (ceil(M / chunk) * per_flush + per_n2)     float32 -> float64 sums, allocation
             + k * N * per_element                                        the native loop
             (refit: + k^2 N flops for its projections)

`bandwidth` is the rate of the streaming backend's `dots` over a matrix larger than the CPU
cache (a cached rate is used when U takes at most a quarter of the last-level cache),
`per_step` its fixed cost per step (Python and the O(N + M) work around the pass),
`gemm_rate(N)` the rate of GramStats' block-triangle product, measured at N = 256 and 1024
(`product_rate`), `per_flush` the cost per element of adding a product buffer into the float64
G, `per_n2` that of the rest of the O(N^2) work (allocating the statistics, the dense loss),
`per_element` the native Gram loop's cost per candidate per step, and the fixed costs those of
each engine's whole pipeline on a tiny problem. The Gram engine is ruled out when G (8 N^2 bytes,
plus 8 N k for refit) would take more than half the free memory of the device. When both
estimates are under 2 ms the streaming engine is kept (nothing to win; it never allocates N x N
and keeps z exactly).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from .._validation import available_memory

_SMALL = 2e-3  # seconds: below this for both engines, stay with streaming
_CACHE: dict[tuple, Rates] = {}


@dataclass
class Rates:
    """Measured rates of one device (and storage dtype for the streaming pass)."""

    bandwidth: float  # bytes / s of the streaming backend's dots pass (U larger than the cache)
    cached_bandwidth: float  # bytes / s of the same pass when U fits in the last-level cache
    per_step: float  # s, fixed cost of a streaming step around the pass
    fixed_stream: float  # s, the streaming pipeline on a tiny problem
    gemm: float  # flops / s of GramStats' product (gfs.stats.build_flops) at n = 1024
    gemm_small: float  # the same at n = 256
    per_flush: float  # s per element of G when a product buffer is added into it
    per_n2: float  # s per element of G for the rest of the O(N^2) work (allocation, dense loss)
    fixed_gram: float  # s, the Gram pipeline (statistics, checks, loop) on a tiny problem
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
    """Measure (once per process, device, dtype and streaming backend) the rates of the model."""
    from . import gram, plan, stream

    device = torch.device(device)
    if backend is None:
        backend, _ = plan.backend_for("stream", device, dtype)
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
    Uc = U[: max(1, (4 << 20) // (1024 * U.element_size()))].contiguous()  # 4 MB: stays in cache
    cached_bandwidth = Uc.numel() * Uc.element_size() / _best_of(lambda: backend.dots(Uc, r), repeat=25)
    # fixed costs per step and per call: small uniform runs, minus their passes
    # (cheap measurements are repeated many times: the minimum is robust to bursts of other load)
    Us, ys, steps = U[:64, :64].contiguous(), r[:64].contiguous(), 20
    loop = lambda k: stream.run_on(backend, Us, ys, k, step="uniform", replacement=True, stop_loss=-1.0)  # noqa: E731
    t_small = _best_of(lambda: loop(steps), repeat=15)
    per_step = max(1e-7, t_small / steps - Us.numel() * Us.element_size() / bandwidth)
    t_one = _best_of(lambda: (stream.dense_loss(Us, ys), loop(1)), repeat=15)
    fixed_stream = max(0.0, t_one - per_step)
    gkey = (str(device), acc)
    if gkey not in _GRAM:
        # GramStats' product at n = 1024; the flush of its buffer into float64 and the other O(N^2)
        # work (allocating the statistics, the dense loss) at n = 2048, beyond the cache
        n, m = 1024, 2048 if acc == torch.float32 else 1024
        A = torch.rand(n, m, generator=g, device=device, dtype=acc)
        buf = gram.Accumulator(n, device)
        gemm = gram.build_flops(n, m) / _best_of(lambda: buf.add(A), repeat=9)
        small = gram.Accumulator(256, device)
        gemm_small = gram.build_flops(256, m) / _best_of(lambda: small.add(A[:256]), repeat=15)
        n = 2048
        buf = gram.Accumulator(n, device)
        buf.add(torch.rand(n, 8, generator=g, device=device, dtype=acc))
        G = torch.zeros(n, n, dtype=torch.float64, device=device)

        def flush():
            buf.cols = 1
            buf.flush(G)

        per_flush = _best_of(flush, repeat=3) / (n * n)

        one = torch.rand(n, 1, generator=g, device=device, dtype=acc)

        def setup():  # what GramStats(n) and its first product allocate and read
            G = torch.zeros(n, n, dtype=torch.float64, device=device)
            buf = gram.Accumulator(n, device)
            buf.add(one)
            buf.flush(G)
            float(G.mean())

        per_n2 = max(0.0, _best_of(setup, repeat=3) / (n * n) - per_flush)
        # the loop, per candidate per step
        n, ksteps = 2048, 128
        B = torch.rand(n, 64, generator=g, device=device, dtype=torch.float64)
        GG, bb = B @ B.T, torch.rand(n, generator=g, device=device, dtype=torch.float64)
        looper, _ = plan.backend_for("gram", device, torch.float64, "uniform")
        t = _best_of(
            lambda: gram.run(
                looper, GG, bb, 1e3, 64, ksteps, step="uniform", replacement=True, stop_loss=-1.0, tol=1e-9
            ),
            repeat=9,
        )
        per_element = t / (ksteps * n)
        # the whole Gram pipeline on a tiny problem: statistics, dense loss, loop
        Ut, yt = (
            torch.rand(64, 64, generator=g, device=device, dtype=acc),
            torch.rand(64, generator=g, device=device, dtype=acc),
        )

        def tiny():
            G = torch.zeros(64, 64, dtype=torch.float64, device=device)
            buf = gram.Accumulator(64, device)
            buf.add(Ut)
            b = (Ut @ yt).double()
            buf.flush(G)
            float(G.mean()), float(b.mean())
            gram.run(
                looper,
                G,
                b,
                float(yt.double() @ yt.double()),
                64,
                1,
                step="uniform",
                replacement=True,
                stop_loss=-1.0,
                tol=1e-9,
            )

        fixed_gram = _best_of(tiny, repeat=15)
        P = torch.rand(64, 1 << 14, generator=g, device=device, dtype=torch.float64)
        v = torch.rand(64, generator=g, device=device, dtype=torch.float64)
        flops = 2 * P.numel() / _best_of(lambda: v @ P, repeat=5)
        _GRAM[gkey] = (gemm, gemm_small, per_flush, per_n2, fixed_gram, per_element, flops)
    gemm, gemm_small, per_flush, per_n2, fixed_gram, per_element, flops = _GRAM[gkey]
    out = Rates(
        bandwidth,
        cached_bandwidth,
        per_step,
        fixed_stream,
        gemm,
        gemm_small,
        per_flush,
        per_n2,
        fixed_gram,
        per_element,
        flops,
    )
    _CACHE[key] = out
    return out


_GRAM: dict[tuple, tuple] = {}


def product_rate(R: Rates, N: int) -> float:
    """Flops / s of GramStats' product for N candidates: measured at 256 and 1024, interpolated in
    log N between them, beyond them the rate at 1024 (larger N) or falling as sqrt(N) (smaller)."""
    if N >= 1024:
        return R.gemm
    if N <= 256:
        return R.gemm_small * math.sqrt(N / 256)
    f = math.log(N / 256) / math.log(4)
    return math.exp((1 - f) * math.log(R.gemm_small) + f * math.log(R.gemm))


_LLC: dict[str, float] = {}


def _cache_bytes(device: torch.device) -> float:
    """Size of the last-level cache (CPU; 0 elsewhere: GPU passes are not modelled as cached)."""
    if device.type != "cpu":
        return 0.0
    if "cpu" not in _LLC:
        size = 8 << 20
        try:
            base = "/sys/devices/system/cpu/cpu0/cache"
            levels = sorted(d for d in os.listdir(base) if d.startswith("index"))
            text = open(os.path.join(base, levels[-1], "size")).read().strip()
            size = int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text)
        except (OSError, ValueError, IndexError, KeyError):
            pass
        _LLC["cpu"] = float(size)
    return _LLC["cpu"]


def free_memory(device: torch.device) -> float:
    """Bytes free on the device (MemAvailable on CPU)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    return float(available_memory())


HEADROOM = 0.9  # a device-resident selection uses at most this fraction of the free device memory


def fits_on_device(
    N: int,
    M: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    free_bytes: float | None = None,
    headroom: float = HEADROOM,
) -> bool:
    """True when features (N, M) of `dtype` plus the GPU backends' workspace fit in `headroom`
    of the device's free memory (always True off CUDA)."""
    from gfs_kernels.host_stream import workspace_bytes

    device = torch.device(device)
    if device.type != "cuda":
        return True
    free = free_memory(device) if free_bytes is None else free_bytes
    need = N * M * (torch.finfo(dtype).bits // 8) + workspace_bytes(N, M, dtype)
    return need <= headroom * free


@dataclass
class Estimate:
    stream: float
    gram: float
    gram_bytes: float
    free_bytes: float


def estimate(
    N: int,
    M: int,
    k: int,
    dtype: torch.dtype,
    step: str,
    device: torch.device,
    backend=None,
    rates: Rates | None = None,
) -> Estimate:
    """Estimated seconds of each engine (features given), and the Gram engine's memory; `rates`
    default to this machine's measured ones (`calibrate`)."""
    from .gram import DEFAULT_CHUNK, build_flops

    R = rates or calibrate(device, dtype, backend)
    item = torch.finfo(dtype).bits // 8
    nbytes = N * M * item
    pass_s = nbytes / (R.cached_bandwidth if nbytes <= 0.25 * _cache_bytes(device) else R.bandwidth)
    kk = min(k, N)
    # (line_search and refit do more small operations per step than the uniform loop measured)
    step_factor = {"uniform": 1.0, "line_search": 1.5, "refit": 4.0}[step]
    stream = R.fixed_stream + 2 * pass_s + k * (pass_s + step_factor * R.per_step)
    loop_factor = {"uniform": 1.0, "line_search": 3.5, "refit": 3.5}[step]
    gram = (
        R.fixed_gram
        + build_flops(N, M) / product_rate(R, N)
        + N * N * (math.ceil(M / DEFAULT_CHUNK) * R.per_flush + R.per_n2)
        + loop_factor * k * N * R.per_element
    )
    gram_bytes = 8.0 * N * N
    if step == "refit":
        proj = kk * kk * N / R.flops  # O(N |set|) projections per step
        stream += proj + kk * kk * M / R.flops  # + rebuilding z for the exact loss
        gram += proj
        gram_bytes += 8.0 * N * kk
    free = free_memory(device) if gram_bytes > (256 << 20) else float("inf")
    return Estimate(stream, gram, gram_bytes, free)


# Rough rates of a small CPU, used to decide without measuring when the answer is clear.
DEFAULT = Rates(
    bandwidth=10e9,
    cached_bandwidth=20e9,
    per_step=80e-6,
    fixed_stream=1e-3,
    gemm=60e9,
    gemm_small=30e9,
    per_flush=5e-9,
    per_n2=5e-9,
    fixed_gram=2e-3,
    per_element=2e-9,
    flops=5e9,
)
_CLEAR = 4.0  # an estimate this many times the other needs no measurement


def faster_engine(
    N: int, M: int, k: int, dtype: torch.dtype, step: str, device: torch.device, backend
) -> tuple[str, str]:
    """("stream" | "gram", reason) for features of shape (N, M), `backend` the streaming backend
    that would run. Decides from default rates when the answer is clear (one engine estimated
    >= 4x faster, or both under 2 ms) and measures the machine (`calibrate`, once per process)
    only when it is close."""
    device = torch.device(device)
    key = (N, M, k, dtype, step, str(device), backend.name)
    if key in _DECISIONS:
        return _DECISIONS[key]
    decision = _choose(N, M, k, dtype, step, device, backend)
    if 8.0 * N * N <= (256 << 20):  # (a decision that read the free memory is not reused)
        if len(_DECISIONS) > 1024:
            _DECISIONS.clear()
        _DECISIONS[key] = decision
    return decision


_DECISIONS: dict[tuple, tuple[str, str]] = {}


def _choose(N, M, k, dtype, step, device, backend) -> tuple[str, str]:
    measured = _CACHE.get((str(device), dtype, backend.name))
    est = estimate(N, M, k, dtype, step, device, backend, rates=measured or DEFAULT)
    source = "measured rates" if measured else "default rates"
    clear = max(est.stream, est.gram) < _SMALL or max(est.stream, est.gram) > _CLEAR * min(est.stream, est.gram)
    if measured is None and not clear:
        est = estimate(N, M, k, dtype, step, device, backend, rates=calibrate(device, dtype, backend))
        source = "measured rates"
        _DECISIONS.clear()  # decisions from default rates are superseded
    shape = f"N={N}, M={M}, k={k}, {str(dtype).removeprefix('torch.')}, {step}"
    times = f"estimated {est.gram:.3g} s Gram vs {est.stream:.3g} s streaming ({source})"
    if est.gram_bytes > 0.5 * est.free_bytes:  # (free_bytes is read only when G is large)
        return "stream", (
            f"auto: streaming engine, the N x N statistics ({est.gram_bytes / 2**30:.3g} GiB) "
            f"exceed half the free memory ({est.free_bytes / 2**30:.3g} GiB); {shape}"
        )
    if est.gram < est.stream and est.stream >= _SMALL:
        return "gram", f"auto: Gram engine, {times}; {shape}"
    why = "" if est.gram >= est.stream else " (both under 2 ms)"
    return "stream", f"auto: streaming engine{why}, {times}; {shape}"


# Grouped convolutions (the materialised contributions) run far below GEMM speed per flop on CPU:
# on a 2-core Xeon, ResNet-50's 3x3 consumers at 224 x 224 with 64 images took 0.8-2.5 s by
# "offsets" and 8-18 s materialised, where the flop counts are about equal.
GROUPED_CONV_SLOWDOWN = 8


def conv2d_method(
    C: int, C_out: int, K: int, positions: int = 1, has_target: bool = True, *, shift_rows: int | None = None
) -> str:
    """conv2d_stats' "auto" choice for a C -> C_out conv with K kernel offsets over `positions`
    output positions: "offsets" (GEMMs on the patches, ~ positions (C K)^2 / 2 multiply-adds),
    "shifts" where the caller offers them (`shift_rows`: the rows of the C x C products of
    gfs.stats' shift plan, ~ shift_rows C^2) or materialising (a grouped convolution,
    ~ positions C C_out K counted GROUPED_CONV_SLOWDOWN times, then a Gram of
    positions C_out C^2 / 2), whichever is cheapest (ties: that order)."""
    common = C_out * (C * K) ** 2 + (positions * C * K * C_out if has_target else 0)
    costs = {"offsets": positions * (C * K) ** 2 / 2 + common}
    if shift_rows is not None:
        costs["shifts"] = shift_rows * C**2 + common
    costs["materialise"] = positions * C * C_out * (GROUPED_CONV_SLOWDOWN * K + C / 2)
    return min(costs, key=lambda m: costs[m])


__all__ = [
    "Rates",
    "calibrate",
    "estimate",
    "faster_engine",
    "free_memory",
    "fits_on_device",
    "conv2d_method",
    "Estimate",
    "DEFAULT",
]

"""pytest-benchmark: the streaming step of each CPU backend, and a bare torch.mv over the same U.

    PYTHONPATH=python:src pytest benchmarks/bench_cpu.py --benchmark-group-by=param:size,param:dtype

Each backend runs its whole uniform loop for STEPS steps (gfs.engines.stream.run_on);
that is STEPS + 1 passes over U (prepare, then one pass per step, the last for the final gap), so
extra_info["per_pass_s"] = min time / (STEPS + 1) is comparable with one torch.mv. "naive" (a
Python loop over the N candidates) runs at the small size only. Timings only: no asserts on
speed (benchmarks/ratios.py prints the ratio table).
"""

from __future__ import annotations

import pytest
import torch

import gfs_kernels
from gfs.engines import stream

SIZES = {"small": (256, 4096), "medium": (1024, 16384), "large": (4096, 65536)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STEPS = 4
SELECT_K = 32
BACKENDS = ["cpu", "torch", "naive"]


@pytest.fixture(scope="module", params=[(s, d) for s in SIZES for d in DTYPES], ids=lambda p: f"{p[0]}-{p[1]}")
def problem(request):
    size, dtype = request.param
    N, M = SIZES[size]
    g = torch.Generator().manual_seed(0)
    U = torch.randn(N, M, generator=g).to(DTYPES[dtype])
    y = U[: N // 2].float().mean(0) + 0.1 * torch.randn(M, generator=g)
    r = torch.randn(M, generator=g)
    return size, dtype, U, y, r


def _per_pass(benchmark, passes):
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["per_pass_s"] = stats.stats.min / passes


@pytest.mark.parametrize("name", BACKENDS)
def test_greedy_steps(benchmark, problem, name):
    size, dtype, U, y, _ = problem
    backend = gfs_kernels.get(name)
    why_not = backend.supports(U.device, U.dtype)
    if why_not:
        pytest.skip(f"{name}: {why_not}")
    if name == "naive" and size != "small":
        pytest.skip("naive (a Python loop over N candidates) is timed at the small size only")
    benchmark.group = f"{size}-{dtype}"
    benchmark.extra_info.update(size=size, dtype=dtype, steps=STEPS, passes=STEPS + 1)
    rounds = 2 if size == "large" else 5
    benchmark.pedantic(
        stream.run_on,
        args=(backend, U, y, STEPS),
        kwargs=dict(step="uniform", replacement=True, stop_loss=-1.0),
        rounds=rounds,
        warmup_rounds=1,
    )
    _per_pass(benchmark, STEPS + 1)


def test_torch_mv(benchmark, problem):
    """One bare torch.mv over the same U (in U's dtype): the bandwidth floor of a step."""
    size, dtype, U, _, r = problem
    benchmark.group = f"{size}-{dtype}"
    benchmark.extra_info.update(size=size, dtype=dtype, passes=1)
    rv = r.to(U.dtype)
    benchmark.pedantic(torch.mv, args=(U, rv), rounds=5 if size == "large" else 20, warmup_rounds=1)
    _per_pass(benchmark, 1)


@pytest.mark.parametrize("name", ["cpu", "torch"])
def test_select_whole(benchmark, problem, name):
    """A whole gfs.select (validation, dense loss, SELECT_K steps) through the public API."""
    size, dtype, U, y, _ = problem
    if size == "large":
        pytest.skip("whole selections are timed at the small and medium sizes")
    gfs = pytest.importorskip("gfs")
    benchmark.group = f"select-{size}-{dtype}"
    benchmark.extra_info.update(size=size, dtype=dtype, k=SELECT_K)
    benchmark.pedantic(gfs.select, args=(U, y, SELECT_K), kwargs=dict(backend=name), rounds=3, warmup_rounds=1)

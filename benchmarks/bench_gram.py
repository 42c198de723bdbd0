"""pytest-benchmark suite of the Gram engine (small shapes, for regressions; the ratio table of the
issue's goals is benchmarks/gram_ratios.py).

    PYTHONPATH=python:src python -m pytest benchmarks/bench_gram.py --benchmark-only
"""

import pytest
import torch

import gfs
from gfs.engines import gram

N, M, K = 1024, 4096, 256


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, M, generator=g), torch.randn(M, generator=g)


@pytest.fixture(scope="module")
def stats(problem):
    return gfs.GramStats.from_features(*problem)


def test_gram_build(benchmark, problem):
    benchmark(gfs.GramStats.from_features, *problem)


@pytest.mark.parametrize("step", ["uniform", "line_search", "refit"])
def test_gram_loop(benchmark, stats, step):
    benchmark(
        gram.run,
        stats.G,
        stats.b,
        stats.yy,
        stats.count,
        K,
        step=step,
        replacement=True,
        stop_loss=-1.0,
        tol=1e-4,
        backend="cpu",
    )


def test_torch_mm_floor(benchmark, problem):
    """The FLOP floor of the build: one bare torch.mm U U^T."""
    U, _ = problem
    benchmark(torch.mm, U, U.T)


@pytest.mark.parametrize("engine", ["stream", "gram", "auto"])
def test_select(benchmark, problem, engine):
    benchmark(gfs.select, *problem, K, engine=engine)

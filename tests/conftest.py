import numpy as np
import pytest
import torch

import gfs_kernels

try:  # numpy's OpenBLAS threads fight over shared cores on the small lstsq of tests/reference.py
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
except ImportError:  # pragma: no cover
    pass


def cpu_backends():
    """Every registered backend, as pytest params; those that cannot run on this CPU are
    skipped with their reason."""
    params = []
    for name, why_not in gfs_kernels.availability("cpu", torch.float32).items():
        marks = [pytest.mark.skip(reason=f"{name}: {why_not}")] if why_not else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def one_thread():
    """Small problems: one intra-op thread (two threads on a shared 2-core machine spin-wait)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

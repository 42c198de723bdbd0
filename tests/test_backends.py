"""Every backend against the float64 brute-force reference, on random and adversarial problems."""

import numpy as np
import pytest
import torch

import gfs
from conftest import cpu_backends
from reference import brute_force_uniform, check_path, path_gaps

BACKENDS = cpu_backends()


def _run(name, U, y, k, replacement=True, eps=None):
    sel = gfs.select(U, y, k, replacement=replacement, eps=eps, backend=name)
    assert sel.backend == name
    return sel


SHAPES = [(1, 1, 3), (1, 7, 4), (7, 1, 5), (5, 3, 9), (33, 65, 20), (64, 300, 40), (130, 257, 17)]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("N,M,k", SHAPES)
@pytest.mark.parametrize("replacement", [True, False])
def test_random_problems_match_reference(name, N, M, k, replacement):
    if not replacement:
        k = min(k, N)
    g = torch.Generator().manual_seed(N * 1000 + M)
    U = torch.randn(N, M, generator=g, dtype=torch.float64)
    y = torch.randn(M, generator=g, dtype=torch.float64)
    sel = _run(name, U, y, k, replacement)
    picks, losses, gaps, _ = brute_force_uniform(U.numpy(), y.numpy(), k, replacement)
    assert sel.indices.tolist() == picks
    np.testing.assert_allclose(sel.losses.numpy(), losses, rtol=1e-5 if name == "naive" else 1e-10)
    np.testing.assert_allclose(sel.gaps.numpy(), gaps, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_storage(name, dtype):
    g = torch.Generator().manual_seed(7)
    U = torch.randn(70, 333, generator=g).to(dtype)
    y = torch.randn(333, generator=g).to(dtype)
    sel = _run(name, U, y, 25)
    # compare with the reference on the values the backend saw (upcast exactly)
    Un, yn = U.double().numpy(), y.double().numpy()
    check_path(Un, yn, sel.indices.tolist(), sel.losses.numpy(), rtol=1e-4)
    np.testing.assert_allclose(sel.gaps.numpy(), path_gaps(Un, yn, sel.indices.tolist()), rtol=1e-3, atol=1e-5)


def _integer_problem(seed, N=24, M=9):
    g = torch.Generator().manual_seed(seed)
    U = torch.randint(-3, 4, (N, M), generator=g).float()
    y = torch.randint(-3, 4, (M,), generator=g).float()
    return U, y


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("replacement", [True, False])
def test_exact_ties_go_to_lowest_index(name, replacement):
    U, y = _integer_problem(1)
    U = torch.cat([U, U, torch.zeros(3, U.shape[1])])  # every candidate twice, plus zero rows
    k = 20
    sel = _run(name, U, y, k, replacement)
    picks, *_ = brute_force_uniform(U.numpy(), y.numpy(), k, replacement)
    assert sel.indices.tolist() == picks
    if replacement:  # the second copy of a candidate can never win a tie against the first
        assert not any(24 <= j < 48 for j in sel.indices.tolist())


@pytest.mark.parametrize("name", BACKENDS)
def test_all_candidates_identical(name):
    U = torch.ones(6, 4)
    sel = _run(name, U, torch.zeros(4), 3, replacement=False)
    assert sel.indices.tolist() == [0, 1, 2]
    sel = _run(name, U, torch.zeros(4), 3, replacement=True)
    assert sel.indices.tolist() == [0, 0, 0]


@pytest.mark.parametrize("name", BACKENDS)
def test_zero_candidates_and_zero_target(name):
    U = torch.zeros(5, 8)
    U[3] = 1.0
    sel = _run(name, U, torch.zeros(8), 4)
    assert sel.indices.tolist() == [0, 0, 0, 0]
    assert float(sel.losses.abs().max()) == 0.0


@pytest.mark.parametrize("name", BACKENDS)
def test_k_larger_than_n_with_replacement(name):
    g = torch.Generator().manual_seed(3)
    U, y = torch.randn(3, 11, generator=g, dtype=torch.float64), torch.randn(11, generator=g, dtype=torch.float64)
    sel = _run(name, U, y, 10)
    assert sel.indices.tolist() == brute_force_uniform(U.numpy(), y.numpy(), 10)[0]
    assert abs(float(sel.weights.sum()) - 1.0) < 1e-12


@pytest.mark.parametrize("name", BACKENDS)
def test_eps_stops_at_the_first_step_within_eps(name):
    g = torch.Generator().manual_seed(5)
    U, y = torch.randn(40, 50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    full = _run(name, U, y, 30)
    eps = 0.05
    stop = full.dense_loss + eps
    first = int(np.argmax(full.losses.numpy() <= stop)) if (full.losses.numpy() <= stop).any() else 29
    sel = _run(name, U, y, 30, eps=eps)
    assert sel.k == first + 1
    assert sel.indices.tolist() == full.indices[: first + 1].tolist()
    assert len(sel.gaps) == sel.k

"""Every step rule on both engines against the float64 brute-force references (tests/reference.py),
on random and adversarial problems; the two engines against each other."""

import numpy as np
import pytest
import torch

import gfs
from reference import (
    brute_force_line_search,
    brute_force_refit,
    brute_force_uniform,
    check_line_search_path,
    check_path,
    check_refit_path,
    path_gaps,
)

ENGINES = ["stream", "gram"]
STEPS = ["uniform", "line_search", "refit"]


def _select(U, y, k, step, engine, replacement=True, **kw):
    sel = gfs.select(U, y, k, step=step, engine=engine, replacement=replacement, **kw)
    assert sel.engine == engine and sel.step == step
    assert abs(float(sel.weights.sum()) - 1) < 1e-9
    assert sel.losses.shape == sel.gaps.shape == sel.indices.shape == sel.notes["gammas"].shape
    return sel


def _check_against_reference(U, y, sel, step, replacement, strict):
    """strict: the picks must be the reference's exactly (well-posed float64 problems);
    otherwise each pick must be a float64 argmin up to rounding along the selection's own path."""
    Un, yn = U.double().numpy(), y.double().numpy()
    k, picks = sel.k, sel.indices.tolist()
    if step == "uniform":
        ref = brute_force_uniform(Un, yn, k, replacement)
        check_path(Un, yn, picks, sel.losses.numpy(), replacement=replacement, rtol=1e-7)
        np.testing.assert_allclose(sel.gaps.numpy(), path_gaps(Un, yn, picks), rtol=1e-6, atol=1e-9)
    elif step == "line_search":
        ref = brute_force_line_search(Un, yn, k, replacement)
        z = check_line_search_path(
            Un, yn, picks, sel.notes["gammas"].numpy(), sel.losses.numpy(), replacement=replacement
        )
        np.testing.assert_allclose(sel.weights.numpy() @ Un, z, rtol=1e-7, atol=1e-9)
    else:
        ref = brute_force_refit(Un, yn, k, replacement)
        check_refit_path(
            Un, yn, picks, sel.losses.numpy(), sel.gaps.numpy(), sel.weights.numpy(), replacement=replacement
        )
    if strict:
        assert picks == ref[0]
        np.testing.assert_allclose(sel.losses.numpy(), ref[1], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(sel.gaps.numpy(), ref[2], rtol=1e-6, atol=1e-9)
        if step != "uniform":
            np.testing.assert_allclose(sel.weights.numpy(), ref[-1], rtol=1e-6, atol=1e-8)


SHAPES = [(1, 1, 3), (1, 7, 4), (7, 1, 5), (5, 3, 9), (33, 65, 20), (64, 300, 40), (130, 257, 17)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("N,M,k", SHAPES)
@pytest.mark.parametrize("replacement", [True, False])
def test_random_problems_match_reference(engine, step, N, M, k, replacement):
    if not replacement:
        k = min(k, N)
    g = torch.Generator().manual_seed(N * 1000 + M)
    U = torch.randn(N, M, generator=g, dtype=torch.float64)
    y = torch.randn(M, generator=g, dtype=torch.float64)
    sel = _select(U, y, k, step, engine, replacement)
    # refit is well posed while the chosen set stays affinely independent (k <= min(N, M + 1))
    strict = step != "refit" or k <= min(N, M + 1)
    _check_against_reference(U, y, sel, step, replacement, strict)


def _integer_problem(seed, N=24, M=9):
    g = torch.Generator().manual_seed(seed)
    U = torch.randint(-3, 4, (N, M), generator=g).double()
    y = torch.randint(-3, 4, (M,), generator=g).double()
    return U, y


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("replacement", [True, False])
def test_ties_duplicates_and_zero_rows(engine, step, replacement):
    U, y = _integer_problem(1)
    U = torch.cat([U, U, torch.zeros(3, U.shape[1])])  # every candidate twice, plus zero rows
    k = 20
    sel = _select(U, y, k, step, engine, replacement)
    _check_against_reference(U, y, sel, step, replacement, strict=step == "uniform")
    if replacement and step != "refit":  # a second copy never wins a tie against the first
        assert not any(24 <= j < 48 for j in sel.indices.tolist())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("step", STEPS)
def test_degenerate_problems(engine, step):
    cases = [
        (torch.ones(6, 4), torch.zeros(4)),  # all candidates identical
        (torch.zeros(5, 8).index_fill_(0, torch.tensor([3]), 1.0), torch.zeros(8)),  # zeros and one row
        (torch.zeros(4, 3), torch.randn(3, generator=torch.Generator().manual_seed(2))),  # all zero
        (torch.tensor([[2.0]]), torch.tensor([1.0])),  # N = M = 1
    ]
    for U, y in cases:
        U, y = U.double(), y.double()
        for rep in (True, False):
            k = 7 if rep else U.shape[0]
            sel = _select(U, y, k, step, engine, rep)
            assert np.isfinite(sel.losses.numpy()).all() and np.isfinite(sel.gaps.numpy()).all()
            assert np.isfinite(sel.weights.numpy()).all()
            _check_against_reference(U, y, sel, step, rep, strict=False)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("step", STEPS)
def test_k_larger_than_n_with_replacement(engine, step):
    g = torch.Generator().manual_seed(3)
    U, y = torch.randn(3, 11, generator=g, dtype=torch.float64), torch.randn(11, generator=g, dtype=torch.float64)
    sel = _select(U, y, 10, step, engine)
    assert sel.k == 10
    _check_against_reference(U, y, sel, step, True, strict=step != "refit")


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("replacement", [True, False])
def test_stream_and_gram_engines_select_the_same(step, replacement):
    g = torch.Generator().manual_seed(9)
    U = torch.randn(150, 90, generator=g, dtype=torch.float64)
    y = U[:40].mean(0) + 0.3 * torch.randn(90, generator=g, dtype=torch.float64)
    a = _select(U, y, 60, step, "stream", replacement)
    b = _select(U, y, 60, step, "gram", replacement)
    assert a.indices.tolist() == b.indices.tolist()
    np.testing.assert_allclose(a.losses.numpy(), b.losses.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.gaps.numpy(), b.gaps.numpy(), rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(a.weights.numpy(), b.weights.numpy(), rtol=1e-7, atol=1e-10)
    assert a.dense_loss == pytest.approx(b.dense_loss, rel=1e-12)


@pytest.mark.parametrize("step", STEPS)
def test_float32_engines_agree_up_to_rounding(step):
    g = torch.Generator().manual_seed(4)
    U = torch.randn(80, 200, generator=g)
    y = torch.randn(200, generator=g)
    for engine in ENGINES:
        sel = _select(U, y, 25, step, engine)
        Un, yn = U.double().numpy(), y.double().numpy()
        if step == "uniform":
            check_path(Un, yn, sel.indices.tolist(), sel.losses.numpy(), rtol=1e-4)
        elif step == "line_search":
            check_line_search_path(
                Un, yn, sel.indices.tolist(), sel.notes["gammas"].numpy(), sel.losses.numpy(), rtol=1e-4
            )
        else:
            check_refit_path(
                Un, yn, sel.indices.tolist(), sel.losses.numpy(), sel.gaps.numpy(), sel.weights.numpy(), rtol=1e-4
            )


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("step", STEPS)
def test_eps_stops_at_the_first_step_within_eps(engine, step):
    g = torch.Generator().manual_seed(5)
    U, y = torch.randn(40, 50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    full = _select(U, y, 30, step, engine)
    stop = full.dense_loss + 0.05
    hit = full.losses.numpy() <= stop
    first = int(np.argmax(hit)) if hit.any() else 29
    sel = _select(U, y, 30, step, engine, eps=0.05)
    assert sel.k == first + 1
    assert sel.indices.tolist() == full.indices[: first + 1].tolist()


def test_line_search_and_refit_do_at_least_as_well_as_uniform():
    g = torch.Generator().manual_seed(6)
    U, y = torch.randn(60, 80, generator=g, dtype=torch.float64), torch.randn(80, generator=g, dtype=torch.float64)
    for engine in ENGINES:
        uni = _select(U, y, 15, "uniform", engine)
        ls = _select(U, y, 15, "line_search", engine)
        rf = _select(U, y, 15, "refit", engine)
        assert rf.loss <= ls.loss + 1e-12 and rf.loss <= uni.loss + 1e-12
        assert np.all(np.diff(ls.losses.numpy()) <= 1e-12)
        assert np.all(np.diff(rf.losses.numpy()) <= 1e-12)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("replacement", [True, False])
def test_native_gram_loop_matches_its_torch_twin(step, replacement):
    """csrc/cpu/gram_cpu.cpp against gfs.engines.gram's torch loops, on well-posed and tied problems."""
    g = torch.Generator().manual_seed(12)
    problems = [
        (torch.randn(150, 80, generator=g, dtype=torch.float64), torch.randn(80, generator=g, dtype=torch.float64))
    ]
    U, y = _integer_problem(3)
    problems.append((torch.cat([U, U, torch.zeros(2, U.shape[1])]), y))
    for U, y in problems:
        stats = gfs.GramStats.from_features(U, y)
        k = 30 if replacement else min(30, U.shape[0])
        native = gfs.select(stats, k=k, step=step, replacement=replacement, backend="cpu")
        twin = gfs.select(stats, k=k, step=step, replacement=replacement, backend="torch")
        assert native.backend == "cpu" and twin.backend == "torch"
        if step != "refit" or U.shape[0] == 150:
            assert native.indices.tolist() == twin.indices.tolist()
            np.testing.assert_allclose(native.losses.numpy(), twin.losses.numpy(), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(native.weights.numpy(), twin.weights.numpy(), rtol=1e-8, atol=1e-10)
        _check_against_reference(U, y, native, step, replacement, strict=False)

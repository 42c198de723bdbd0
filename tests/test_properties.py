"""Property tests (hypothesis) of the greedy rule, on every CPU backend."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import gfs
from conftest import cpu_backends
from reference import hull_optimum

finite = st.floats(-8, 8, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def problems(draw, max_n=12, max_m=10):
    n = draw(st.integers(1, max_n))
    m = draw(st.integers(1, max_m))
    U = draw(arrays(np.float64, (n, m), elements=finite))
    y = draw(arrays(np.float64, (m,), elements=finite))
    return U, y


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", cpu_backends())
@SETTINGS
@given(problem=problems(), k=st.integers(1, 15), replacement=st.booleans())
def test_first_pick_weights_and_repeats(name, problem, k, replacement):
    U, y = problem
    if not replacement:
        k = min(k, len(U))
    sel = gfs.select(U, y, k, replacement=replacement, backend=name)
    single = ((y[None] - U) ** 2).mean(1)
    first = int(sel.indices[0])
    assert single[first] <= single.min() * (1 + 1e-6) + 1e-9  # the single best candidate
    # a true tie (an identical earlier row) must go to the lowest index
    assert not any(np.array_equal(U[i], U[first]) for i in range(first))
    assert abs(float(sel.weights.sum()) - 1) < 1e-9 and float(sel.weights.min()) >= 0
    if not replacement:
        assert len(set(sel.indices.tolist())) == sel.k


@pytest.mark.parametrize("name", cpu_backends())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(max_n=6, max_m=5), k=st.integers(1, 8))
def test_gap_bounds_distance_to_hull_optimum(name, problem, k):
    U, y = problem
    sel = gfs.select(U, y, k, backend=name)
    best = hull_optimum(U, y)
    scale = 1e-6 * (1 + float(np.abs(U).max()) ** 2 + float(np.abs(y).max()) ** 2)
    assert np.all(sel.losses.numpy() >= best - scale)
    assert np.all(sel.gaps.numpy() >= sel.losses.numpy() - best - scale)


@pytest.mark.parametrize("engine", ["stream", "gram"])
@SETTINGS
@given(problem=problems(), k=st.integers(1, 15), replacement=st.booleans())
def test_line_search_losses_never_increase(engine, problem, k, replacement):
    U, y = problem
    if not replacement:
        k = min(k, len(U))
    sel = gfs.select(U, y, k, replacement=replacement, step="line_search", engine=engine)
    losses = sel.losses.numpy()
    scale = 1e-12 * (1 + float(np.abs(U).max()) ** 2 + float(np.abs(y).max()) ** 2)
    assert np.all(np.diff(losses) <= scale)
    single = ((y[None] - U) ** 2).mean(1)
    assert single[int(sel.indices[0])] <= single.min() * (1 + 1e-9) + 1e-12  # the single best candidate
    gam = sel.notes["gammas"].numpy()
    assert gam[0] == 1.0 and np.all((gam >= 0) & (gam <= 1))
    assert abs(float(sel.weights.sum()) - 1) < 1e-9 and float(sel.weights.min()) >= -1e-15


@pytest.mark.parametrize("step", ["line_search", "refit"])
@pytest.mark.parametrize("engine", ["stream", "gram"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(max_n=6, max_m=5), k=st.integers(1, 8))
def test_gap_bounds_distance_to_hull_optimum_every_rule(step, engine, problem, k):
    U, y = problem
    sel = gfs.select(U, y, k, step=step, engine=engine)
    best = hull_optimum(U, y)
    scale = 1e-6 * (1 + float(np.abs(U).max()) ** 2 + float(np.abs(y).max()) ** 2)
    if step == "line_search":  # z stays in the convex hull
        assert np.all(sel.losses.numpy() >= best - scale)
    assert np.all(sel.gaps.numpy() >= sel.losses.numpy() - best - scale)

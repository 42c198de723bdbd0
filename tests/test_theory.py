"""gfs.theory: diagnostics against direct computation, the greedy bound."""

import math

import pytest
import torch

import gfs
from gfs import theory

pytestmark = pytest.mark.usefixtures("one_thread")


class Stats:
    """A GramStats-like object (duck-typed: G, b, yy, count)."""

    def __init__(self, U, y):
        U, y = U.double(), y.double()
        self.G, self.b, self.yy, self.count = U @ U.T, U @ y, float(y @ y), U.shape[1]


def problem(N, M, seed, inside=True):
    g = torch.Generator().manual_seed(seed)
    U = torch.rand(N, M, generator=g, dtype=torch.float64)
    if inside:  # y a convex combination of the candidates: y lies in the hull
        w = torch.rand(N, generator=g, dtype=torch.float64)
        y = (w / w.sum()) @ U
    else:
        y = torch.randn(M, generator=g, dtype=torch.float64)
    return U, y


def test_diameter_vs_brute_force():
    U, y = problem(23, 17, 0)
    U[5] = U[3]  # a duplicate
    brute = max(float((U[i] - U[j]).norm()) for i in range(23) for j in range(23))
    assert abs(theory.polytope_diameter(U) - brute) < 1e-9
    assert abs(theory.polytope_diameter(stats=Stats(U, y)) - brute) < 1e-9
    assert theory.polytope_diameter(torch.ones(4, 3)) == 0.0


@pytest.mark.parametrize("N,M", [(12, 30), (30, 12)])
def test_spectrum_vs_svd(N, M):
    U, y = problem(N, M, 1)
    sv = torch.linalg.svdvals(U)
    for spec in (theory.gram_spectrum(U), theory.gram_spectrum(stats=Stats(U, y))):
        assert len(spec.singular_values) == min(N, M)
        assert torch.allclose(spec.singular_values, sv, rtol=1e-6, atol=1e-8)
        assert abs(spec.condition - float(sv[0] / sv[-1])) < 1e-6 * spec.condition
        assert abs(spec.gram_min_eig - float(sv[-1]) ** 2) < 1e-8
    rank_deficient = torch.cat([U[:5], U[:5]])
    assert math.isinf(theory.gram_spectrum(rank_deficient[:, :30] if M >= 10 else rank_deficient).condition)


def test_losses_and_gap_from_features_and_stats():
    U, y = problem(15, 40, 2, inside=False)
    s = Stats(U, y)
    assert abs(theory.initial_loss(y) - float((y**2).mean())) < 1e-12
    assert abs(theory.initial_loss(stats=s) - float((y**2).mean())) < 1e-12
    sel = gfs.select(U, y, 12, backend="torch")
    z = sel.weights @ U
    direct = max(float(2 * (y - z) @ (U[j] - z)) for j in range(15)) / 40
    assert abs(theory.frank_wolfe_gap(sel.weights, U, y) - direct) < 1e-10
    assert abs(theory.frank_wolfe_gap(sel.weights, stats=s) - direct) < 1e-10
    assert abs(float(sel.gaps[-1]) - direct) < 1e-8
    d1, d2 = theory.diagnose(U, y, selection=sel), theory.diagnose(stats=s, selection=sel)
    assert abs(d1.dense_loss - sel.dense_loss) < 1e-10 and abs(d2.dense_loss - sel.dense_loss) < 1e-10
    assert abs(d1.diameter - d2.diameter) < 1e-9
    # the certified lower bound of the hull optimum is below every point of the hull we know
    assert d1.hull_loss_lower_bound <= min(float(sel.losses.min()), sel.dense_loss) + 1e-12
    assert "diameter" in d1.summary()


@pytest.mark.parametrize("inside", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bound_holds_for_the_uniform_rule(inside, seed):
    U, y = problem(40, 25, seed, inside=inside)
    d = theory.diagnose(U, y, k=120, backend="torch")
    assert d.bound_applies and d.bound_holds
    assert torch.all(d.losses <= d.bound + 1e-12)
    assert abs(float(d.bound[0]) - float(d.losses[0])) < 1e-12  # B_1 = f(z_1)
    # and it is a real bound, not a vacuous one: it tends to the dense loss
    H = sum(1 / i for i in range(1, 121))
    expected = d.dense_loss + (float(d.losses[0]) - d.dense_loss + d.diameter2 * (H - 1)) / 120
    assert abs(float(d.bound[-1]) - expected) < 1e-12


def test_bound_with_the_hull_optimum_as_reference():
    # two candidates and y their midpoint: hull optimum 0; the bound with reference 0 holds too
    U = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0], dtype=torch.float64)
    sel = gfs.select(U, y, 9, backend="torch")
    b = theory.greedy_bound(9, float(sel.losses[0]), 0.0, 4.0 / 2)
    assert torch.all(sel.losses <= b + 1e-12)
    assert float(sel.losses[1]) == 0.0  # k=2 hits the midpoint


def test_bound_not_claimed_without_replacement():
    U, y = problem(10, 8, 3)
    d = theory.diagnose(U, y, k=6, replacement=False, backend="torch")
    assert d.bound is None and d.bound_applies is False and "replacement" in d.notes[0]
    with pytest.raises(ValueError, match="selection"):
        theory.diagnose(stats=Stats(U, y), k=3)


def test_bad_input_is_refused_naming_the_argument():
    U, y = problem(6, 5, 0)
    with pytest.raises(TypeError, match="features must be a torch.Tensor"):
        theory.polytope_diameter(U.tolist())
    with pytest.raises(ValueError, match="features contains NaN"):
        theory.gram_spectrum(torch.full((3, 4), float("nan")))
    with pytest.raises(ValueError, match="targets has shape"):
        theory.frank_wolfe_gap(torch.ones(6) / 6, U, y[:3])
    with pytest.raises(TypeError, match="weights has dtype"):
        theory.frank_wolfe_gap(torch.ones(6, dtype=torch.int64), U, y)

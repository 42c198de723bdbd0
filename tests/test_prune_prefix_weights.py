"""With replacement, gfs.prune keeps the greedy prefix with ``keep`` distinct channels: that prefix
must carry the weights of its own step rule (what a run of that many steps returns), not counts / t.

- uniform: counts / t;
- line_search: the weights after t steps of w <- (1 - gamma) w + gamma e_j;
- refit: the affine least-squares refit (weights summing to 1) of the chosen set.
"""

import numpy as np
import pytest
import torch

import gfs
from gfs.pruning import prune
from gfs.pruning.criteria import _prefix_with_distinct, select_channels

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = ("uniform", "line_search", "refit")


def problem():
    """A target inside the hull, near candidate 0: the uniform and line-search rules come back to
    it (repeats) before they have 5 distinct candidates."""
    g = torch.Generator().manual_seed(1)
    U = torch.randn(12, 30, generator=g, dtype=torch.float64)
    y = 0.7 * U[0] + 0.3 * U[1:6].mean(0) + 0.05 * torch.randn(30, generator=g, dtype=torch.float64)
    return U, y


def loss_of(U, y, w):
    return float(((y - w @ U) ** 2).mean())


def affine_refit(U, y, members):
    """min ||y - sum_j w_j u_j||^2 subject to sum w_j = 1 over ``members``, by its KKT system in
    numpy (independent of the engines' incremental Cholesky)."""
    A = U[members].numpy()
    m = len(members)
    K = np.zeros((m + 1, m + 1))
    K[:m, :m] = A @ A.T
    K[:m, m] = K[m, :m] = 1.0
    rhs = np.concatenate([A @ y.numpy(), [1.0]])
    w = np.zeros(U.shape[0])
    w[members] = np.linalg.solve(K, rhs)[:m]
    return torch.from_numpy(w)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("stats", [False, True], ids=["features", "gram-stats"])
def test_select_channels_with_replacement_weights_the_prefix_by_its_step_rule(step, stats):
    U, y = problem()
    keep = 5
    args = (gfs.GramStats.from_features(U, y), None) if stats else (U, y)
    sel = select_channels(*args, keep, step=step, replacement=True)
    assert sel.support.numel() == keep
    t = sel.k
    if step != "refit":  # refit never repeats a candidate and then adds a new one: no cut there
        assert t > keep  # the prefix has repeats, so it was cut from a longer run
    ref = gfs.select(*args, k=t, step=step, replacement=True)  # what a run of t steps returns
    assert torch.equal(sel.indices, ref.indices)
    assert torch.allclose(sel.weights, ref.weights, rtol=0, atol=1e-12), (sel.weights, ref.weights)
    assert abs(float(sel.weights.sum()) - 1) < 1e-12
    assert sel.notes["gammas"].numel() == t
    # the weights are those of the reported loss: the folded scales give the selection's loss
    assert loss_of(U, y, sel.weights) == pytest.approx(sel.loss, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("step", STEPS)
def test_a_cut_prefix_carries_its_own_weights(step):
    """_prefix_with_distinct on a longer run of every rule (refit included, whose cut the greedy
    loop cannot produce on its own): independent checks of each rule's weights."""
    U, y = problem()
    long = gfs.select(U, y, k=9, step=step, replacement=True)
    keep = 3
    pre = _prefix_with_distinct(long, keep, U, y)
    t = pre.k
    assert t < long.k and pre.support.numel() == keep
    assert torch.equal(pre.indices, long.indices[:t])
    idx, gammas = pre.indices.tolist(), pre.notes["gammas"].tolist()
    if step == "uniform":
        expected = torch.bincount(pre.indices, minlength=12).double() / t
    elif step == "line_search":
        expected = torch.zeros(12, dtype=torch.float64)
        for j, gamma in zip(idx, gammas, strict=True):
            expected *= 1 - gamma
            expected[j] += gamma
    else:
        members = [j for j, gamma in zip(idx, gammas, strict=True) if gamma == 1.0]
        expected = affine_refit(U, y, members)
    assert torch.allclose(pre.weights, expected, rtol=1e-9, atol=1e-10), (pre.weights, expected)
    assert loss_of(U, y, pre.weights) == pytest.approx(float(long.losses[t - 1]), rel=1e-9, abs=1e-12)
    assert torch.equal(pre.losses, long.losses[:t]) and torch.equal(pre.gaps, long.gaps[:t])


@pytest.mark.parametrize("step", ["line_search", "refit"])
def test_prune_with_replacement_folds_the_selection_weights(step):
    """The pruned consumer's loss (measured on the folded scales) is the selection's loss."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.ReLU(), torch.nn.Linear(40, 8)).eval()
    with torch.no_grad():
        model[2].weight.copy_(torch.randn(8, 40, generator=g))
        model[2].weight[:, 1:].mul_(0.05)  # channel 0 dominates the consumer's output
        model[0].weight.copy_(torch.randn(40, 6, generator=g))
    x = torch.randn(64, 6, generator=g)
    result = prune(model, x, keep=6, step=step, replacement=True, progress=False)
    r, sel = result.report[0], result.selections["0"]
    assert r.channels_after == 6 == sel.support.numel()
    assert torch.allclose(r.scale, 40 * sel.weights[r.kept].to(r.scale.dtype))
    assert r.loss == pytest.approx(sel.loss, rel=1e-4)

"""gfs.select: the result type, input handling, and every bad input named clearly."""

import numpy as np
import pytest
import torch

import gfs
import gfs_kernels
from reference import brute_force_uniform


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(11)
    return torch.randn(20, 3, 5, generator=g), torch.randn(3, 5, generator=g)


def test_selection_fields(problem):
    U, y = problem
    sel = gfs.select(U, y, 8)
    assert isinstance(sel, gfs.Selection)
    assert sel.indices.dtype == torch.int64 and sel.indices.shape == (8,)
    assert torch.equal(sel.support, torch.unique(sel.indices))
    assert sel.weights.shape == (20,) and abs(float(sel.weights.sum()) - 1) < 1e-12
    counts = torch.bincount(sel.indices, minlength=20).double()
    assert torch.allclose(sel.weights, counts / 8)
    assert sel.losses.shape == sel.gaps.shape == (8,)
    dense = float(((y.double() - U.double().mean(0)) ** 2).mean())
    assert abs(sel.dense_loss - dense) < 1e-6
    assert sel.k == 8 and sel.engine == "stream" and sel.step == "uniform"
    assert sel.backend in gfs_kernels.names() and sel.reason.startswith("auto")
    assert sel.seconds > 0 and set(sel.timings) == {"validate", "dense", "select"}
    # the subnetwork's output reproduces the last loss
    out = sel.output(U.reshape(20, -1).double())
    assert abs(float(((y.reshape(-1).double() - out) ** 2).mean()) - sel.loss) < 1e-6
    assert "Selection(k=8" in repr(sel)


def test_shapes_numpy_and_noncontiguous_inputs(problem):
    U, y = problem
    ref = gfs.select(U.reshape(20, 15), y.reshape(15), 6).indices
    assert torch.equal(gfs.select(U, y.reshape(15), 6).indices, ref)  # (N, *S) with (M,) targets
    assert torch.equal(gfs.select(U.numpy(), y.numpy(), 6).indices, ref)
    Ut = U.reshape(20, 15).t().contiguous().t()  # same values, column-major strides
    assert not Ut.is_contiguous()
    assert torch.equal(gfs.select(Ut, y.reshape(15), 6).indices, ref)


def test_matches_reference_with_and_without_replacement(problem):
    U, y = problem
    for rep in (True, False):
        sel = gfs.select(U.double(), y.double(), 15, replacement=rep)
        assert sel.indices.tolist() == brute_force_uniform(U.numpy(), y.numpy(), 15, rep)[0]
        if not rep:
            assert len(set(sel.indices.tolist())) == 15


def test_inputs_are_not_modified(problem):
    U, y = problem
    U0, y0 = U.clone(), y.clone()
    gfs.select(U, y, 5)
    Un, yn = U.numpy().copy(), y.numpy().copy()
    gfs.select(Un, yn, 5, replacement=False)
    assert torch.equal(U, U0) and torch.equal(y, y0)
    assert np.array_equal(Un, U0.numpy()) and np.array_equal(yn, y0.numpy())


def _bad(problem, **change):
    U, y = problem
    args = dict(features=U, targets=y, k=3)
    args.update(change)
    return args


BAD = {
    "nan features": (
        lambda U, y: dict(features=U.index_put((torch.tensor([2]),), torch.tensor(float("nan")))),
        ValueError,
        "features contains NaN or Inf",
    ),
    "inf targets": (
        lambda U, y: dict(targets=torch.full_like(y, float("inf"))),
        ValueError,
        "targets contains NaN or Inf",
    ),
    "shape mismatch": (lambda U, y: dict(targets=torch.zeros(14)), ValueError, "targets has shape (14,)"),
    "1-d features": (lambda U, y: dict(features=torch.zeros(15)), ValueError, "features must have shape (N, M)"),
    "empty features": (
        lambda U, y: dict(features=torch.zeros(0, 15), targets=torch.zeros(15)),
        ValueError,
        "features is empty",
    ),
    "int features": (lambda U, y: dict(features=U.to(torch.int32)), TypeError, "features has dtype torch.int32"),
    "int numpy targets": (
        lambda U, y: dict(targets=np.zeros((3, 5), dtype=np.int64)),
        TypeError,
        "targets has dtype int64",
    ),
    "list features": (lambda U, y: dict(features=U.tolist()), TypeError, "features must be a torch.Tensor"),
    "missing targets": (lambda U, y: dict(targets=None), ValueError, "targets is missing"),
    "targets without data": (
        lambda U, y: dict(targets=torch.empty(3, 5, device="meta")),
        ValueError,
        "targets is on the meta device",
    ),
    "k zero": (lambda U, y: dict(k=0), ValueError, "k must be >= 1"),
    "k negative": (lambda U, y: dict(k=-2), ValueError, "k must be >= 1"),
    "k float": (lambda U, y: dict(k=2.0), TypeError, "k must be an int"),
    "k bool": (lambda U, y: dict(k=True), TypeError, "k must be an int"),
    "k > N without replacement": (
        lambda U, y: dict(k=21, replacement=False),
        ValueError,
        "k=21 is larger than the 20 candidates",
    ),
    "unknown step": (lambda U, y: dict(step="greedy"), ValueError, "unknown step 'greedy'"),
    "unknown backend": (lambda U, y: dict(backend="fast"), ValueError, "unknown backend 'fast'"),
    "negative eps": (lambda U, y: dict(eps=-1.0), ValueError, "eps must be None or a finite number >= 0"),
    "nan eps": (lambda U, y: dict(eps=float("nan")), ValueError, "eps must be None"),
    "replacement not bool": (lambda U, y: dict(replacement="no"), TypeError, "replacement must be True or False"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_named_and_nothing_changes(problem, case):
    U, y = problem
    U0, y0 = U.clone(), y.clone()
    change, error, message = BAD[case]
    args = dict(features=U, targets=y, k=3)
    args.update(change(U, y))
    with pytest.raises(error) as info:
        gfs.select(args.pop("features"), args.pop("targets"), args.pop("k"), **args)
    assert message in str(info.value)
    assert torch.equal(U, U0) and torch.equal(y, y0)


def test_unavailable_backend_is_an_error_with_its_reason(problem, monkeypatch):
    U, y = problem
    monkeypatch.setattr(gfs_kernels.get("torch"), "unavailable_reason", lambda: "switched off for this test")
    with pytest.raises(ValueError, match="backend 'torch' cannot run here: switched off for this test"):
        gfs.select(U, y, 3, backend="torch")


def test_auto_skips_unavailable_backends_with_a_reason(problem, monkeypatch):
    U, y = problem
    monkeypatch.setitem(gfs_kernels.PREFERENCE, "cpu", ["cpu", "torch"])
    monkeypatch.setattr(gfs_kernels.get("cpu"), "unavailable_reason", lambda: "not built in this test")
    sel = gfs.select(U, y, 3)
    assert sel.backend == "torch"
    assert "cpu: not built in this test" in sel.reason


def test_every_step_rule_runs_on_both_engines(problem):
    U, y = problem
    for step in ("uniform", "line_search", "refit"):
        for engine in ("stream", "gram"):
            sel = gfs.select(U, y, 5, step=step, engine=engine)
            assert sel.engine == engine and sel.step == step and sel.k == 5
            assert f"{engine} engine requested" in sel.reason
            assert abs(float(sel.weights.sum()) - 1) < 1e-9
            assert sel.notes["gammas"].shape == (5,)


def test_k_is_required(problem):
    U, y = problem
    with pytest.raises(TypeError, match="k is missing"):
        gfs.select(U, y)
    with pytest.raises(TypeError, match="k is missing"):
        gfs.select(gfs.GramStats.from_features(U, y))


def test_engine_choice_is_recorded(problem):
    U, y = problem
    sel = gfs.select(U, y, 4)
    assert sel.reason.startswith("auto: streaming engine") and "estimated" in sel.reason
    sel = gfs.select(U, y, 4, backend="torch")
    assert sel.engine == "stream" and "backend 'torch' requested" in sel.reason
    sel = gfs.select(U, y, 4, engine="gram")
    assert sel.engine == "gram" and sel.backend in ("cpu", "torch")
    assert set(sel.timings) == {"validate", "stats", "dense", "select"}
    sel = gfs.select(U, y, 4, engine="gram", backend="torch")
    assert sel.backend == "torch"


def test_select_from_stats(problem):
    U, y = problem
    stats = gfs.GramStats.from_features(U, y)
    sel = gfs.select(stats, k=8)
    ref = gfs.select(U.double(), y.double(), 8, engine="stream")
    assert sel.engine == "gram" and "statistics given" in sel.reason
    assert sel.indices.tolist() == ref.indices.tolist()
    assert sel.dense_loss == pytest.approx(ref.dense_loss, rel=1e-6)
    U0 = stats.G.clone()
    gfs.select(stats, k=3, step="refit")
    assert torch.equal(stats.G, U0)


STATS_BAD = {
    "targets with stats": (
        dict(targets=torch.zeros(15)),
        ValueError,
        "targets must be None when features is a GramStats",
    ),
    "stream engine with stats": (dict(engine="stream"), ValueError, "engine='stream' needs the features matrix"),
    "unknown engine": (dict(engine="fast"), ValueError, "unknown engine 'fast'"),
    "naive backend on gram": (dict(backend="naive"), ValueError, "the Gram engine has no backend 'naive'"),
    "k > N without replacement": (dict(k=21, replacement=False), ValueError, "k=21 is larger than the 20 candidates"),
}


@pytest.mark.parametrize("case", list(STATS_BAD))
def test_bad_input_with_stats(problem, case):
    U, y = problem
    stats = gfs.GramStats.from_features(U, y)
    args = dict(k=3)
    change, error, message = STATS_BAD[case]
    args.update(change)
    with pytest.raises(error, match=None) as info:
        gfs.select(stats, args.pop("targets", None), args.pop("k"), **args)
    assert message in str(info.value)


def test_bad_engine_with_features(problem):
    U, y = problem
    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        gfs.select(U, y, 3, engine="fast")
    with pytest.raises(ValueError, match="the Gram engine has no backend 'naive'"):
        gfs.select(U, y, 3, engine="gram", backend="naive")

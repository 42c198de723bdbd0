"""Hostile input: whatever a caller passes in, gfs gives the float64 reference's selection or a
clear error naming the argument, never a silently wrong answer (issue 11).

Magnitudes over each dtype's whole finite range, strides, byte orders, dtypes, devices, a k
that cannot fit in memory, statistics files that lie about their sizes, and exactly duplicated
candidates on the Gram engine, on every backend and engine that runs on this machine.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gfs
import gfs_kernels
from gfs import _scale
from gfs.stats import GramStats
from reference import (
    brute_force_line_search,
    brute_force_refit,
    brute_force_uniform,
    check_line_search_path,
    check_path,
    check_refit_path,
)

REFERENCE = {"uniform": brute_force_uniform, "line_search": brute_force_line_search, "refit": brute_force_refit}

# (engine, backend) pairs that run here; "naive" is the slow baseline, uniform rule only
RUNS = [("stream", name) for name, why in gfs_kernels.availability("cpu", torch.float32).items() if why is None]
RUNS += [("gram", "cpu"), ("gram", "torch")]

# the finite range of each storage dtype, as exponents e of values u * 2^e with |u| < 1
RANGE = {
    torch.float32: (-149, 127),  # 1.4e-45 (the smallest denormal) .. 3.4e38
    torch.bfloat16: (-133, 127),
    torch.float16: (-24, 15),  # 6e-8 .. 65504
    torch.float64: (-500, 500),  # losses stay float64 numbers; beyond: test_float64_extremes
}


def _problem(seed: int, dtype: torch.dtype, exponent: int, N=7, M=23):
    """(U, y) in `dtype`, of magnitude 2^exponent, and the same values as float64 numpy arrays
    times 2^-exponent (an exact rescale, so the reference never under- or overflows)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.rand(N, M, generator=g, dtype=torch.float64) * 2 - 1
    y = (U[: N // 2].mean(0) + 0.3 * (torch.rand(M, generator=g, dtype=torch.float64) * 2 - 1)).clamp(-0.999, 0.999)
    Ut, yt = (torch.from_numpy(np.ldexp(x.numpy(), exponent)).to(dtype) for x in (U, y))
    return Ut, yt, np.ldexp(Ut.double().numpy(), -exponent), np.ldexp(yt.double().numpy(), -exponent)


def _select(U, y, k, engine, backend, step, replacement=True):
    return gfs.select(U, y, k, engine=engine, backend=backend, step=step, replacement=replacement)


@pytest.mark.parametrize("engine,backend", RUNS, ids=[f"{e}-{b}" for e, b in RUNS])
@pytest.mark.parametrize("step", list(REFERENCE))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_finite_magnitude_selects_what_float64_selects(engine, backend, step, data, one_thread):
    if backend == "naive" and step != "uniform":
        return  # the baseline has the papers' rule only
    dtype = data.draw(st.sampled_from(list(RANGE)), label="dtype")
    lo, hi = RANGE[dtype]
    exponent = data.draw(st.one_of(st.integers(lo, hi), st.sampled_from([lo, lo + 1, hi - 1, hi, 0])), label="exponent")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    U, y, Un, yn = _problem(seed, dtype, exponent)
    k = 5
    amax = max(float(U.abs().max()), float(y.abs().max()))
    if engine == "gram" and dtype == torch.float64 and _scale.rescale_exponent(amax, dtype, U.shape[1]):
        with pytest.raises(ValueError, match="(overflow|underflow) the float64 statistics"):
            _select(U, y, k, engine, backend, step)
        return  # G = U U^T itself is not a float64 number there: refused, not wrong
    sel = _select(U, y, k, engine, backend, step)
    losses, gaps = (np.ldexp(x.numpy(), -2 * exponent) for x in (sel.losses, sel.gaps))
    # every pick a float64 argmin up to the rounding of the accumulation, the reported losses the
    # true ones (the reference follows gfs's own picks)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype != torch.float64 else dict(rtol=1e-9, atol=1e-12)
    picks = sel.indices.tolist()
    # (near the bottom of a dtype's range the data keep a few bits, and distinct candidates tie in
    # exact arithmetic; the lowest index is promised between identical candidates)
    if step == "uniform":
        check_path(Un, yn, picks, losses, distinct_ties=False, **tol)
    elif step == "line_search":
        check_line_search_path(Un, yn, picks, sel.notes["gammas"].numpy(), losses, distinct_ties=False, **tol)
    else:
        check_refit_path(Un, yn, picks, losses, gaps, sel.weights.numpy(), **tol)
    assert math.isclose(float(sel.weights.sum()), 1.0, rel_tol=1e-9)


@pytest.mark.parametrize("engine,backend", RUNS, ids=[f"{e}-{b}" for e, b in RUNS])
@pytest.mark.parametrize("step", list(REFERENCE))
@pytest.mark.parametrize("exponent", [-1020, -900, 900, 1000, 1022])
def test_float64_extremes(engine, backend, step, exponent, one_thread):
    """float64 data near the ends of its range: the streaming engine selects what float64
    selects on the rescaled data (losses in the caller's units round to 0 or inf there); the
    Gram engine, whose G = U U^T is no float64 number there, refuses with a clear error."""
    if backend == "naive" and step != "uniform":
        return
    U, y, Un, yn = _problem(5, torch.float64, exponent)
    if engine == "gram":
        with pytest.raises(ValueError, match="(overflow|underflow) the float64 statistics"):
            _select(U, y, 5, engine, backend, step)
        return
    sel = _select(U, y, 5, engine, backend, step)
    assert sel.indices.tolist() == list(map(int, REFERENCE[step](Un, yn, 5)[0]))
    assert "rescaled" in sel.notes


@pytest.mark.parametrize("engine,backend", RUNS, ids=[f"{e}-{b}" for e, b in RUNS])
@pytest.mark.parametrize("scale", [1e20, 1e-40, 3e38 / 8, 1.5e-45 * 2**10])
def test_the_audited_magnitudes(engine, backend, scale, one_thread):
    """float32 U, y times 1e20 picked [0, 0, 0, 0] (naive crashed); denormals did too."""
    g = torch.Generator().manual_seed(1)
    U, y = torch.randn(4, 32, generator=g), torch.randn(32, generator=g)
    want = gfs.select(U.double(), y.double(), 4, backend="torch").indices.tolist()
    Us, ys = (U / U.abs().max() * scale).float(), (y / U.abs().max() * scale).float()
    ref = brute_force_uniform(Us.double().numpy() / scale, ys.double().numpy() / scale, 4)[0]
    sel = gfs.select(Us, ys, 4, engine=engine, backend=backend)
    assert sel.indices.tolist() == list(map(int, ref))
    if scale > 1e-30:  # (denormal inputs keep only a few bits: another problem than U, y)
        assert sel.indices.tolist() == want
    assert torch.isfinite(sel.losses).all() and (sel.losses > 0).all()
    if engine == "stream" and scale != 1.0:
        assert "rescaled" in sel.notes


# -- strides, byte order, autograd, devices, dtypes -------------------------------------------
def _base():
    g = torch.Generator().manual_seed(2)
    return torch.randn(9, 40, generator=g), torch.randn(40, 3, generator=g)


LAYOUTS = {
    "targets a matrix column": lambda U, Y: (U, Y[:, 0]),
    "features transposed view": lambda U, Y: (U.T.contiguous().T, Y[:, 1].clone()),
    "features every other column": lambda U, Y: (torch.cat([U, U], 1)[:, ::2], Y[:, 2]),
    "numpy strided": lambda U, Y: (np.repeat(U.numpy(), 2, axis=1)[:, ::2], Y.numpy()[:, 0]),
    "numpy fortran order": lambda U, Y: (np.asfortranarray(U.numpy()), np.ascontiguousarray(Y.numpy()[:, 0])),
    "numpy big-endian": lambda U, Y: (U.numpy().astype(">f4"), Y.numpy()[:, 0].astype(">f4")),
    "requires grad": lambda U, Y: (U.clone().requires_grad_(), Y[:, 0].clone().requires_grad_()),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("step", list(REFERENCE))
@pytest.mark.parametrize("engine", ["stream", "gram"])
def test_every_layout_gives_the_contiguous_result(layout, step, engine, one_thread):
    U, Y = _base()
    Ua, ya = LAYOUTS[layout](U, Y)
    before = [np.array(x, copy=True) if isinstance(x, np.ndarray) else x.detach().clone() for x in (Ua, ya)]
    Uc = torch.as_tensor(np.ascontiguousarray(Ua.detach() if isinstance(Ua, torch.Tensor) else Ua.astype("=f4")))
    yc = torch.as_tensor(np.ascontiguousarray(ya.detach() if isinstance(ya, torch.Tensor) else ya.astype("=f4")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # requires_grad inputs used to warn from inside gfs
        got = gfs.select(Ua, ya, 6, step=step, engine=engine)
    want = gfs.select(Uc.contiguous(), yc.contiguous(), 6, step=step, engine=engine)
    assert got.indices.tolist() == want.indices.tolist()
    torch.testing.assert_close(got.losses, want.losses)
    for x, x0 in zip((Ua, ya), before, strict=True):  # nothing passed in is modified
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, x0)
        else:
            assert torch.equal(x.detach(), x0)


def test_strided_targets_on_the_default_backend_every_step_rule():
    """The audit: gfs.select(U, Y[:, 0], 3) crashed the cpu kernel ('y must be contiguous')."""
    U, Y = _base()
    for step in REFERENCE:
        assert (
            gfs.select(U, Y[:, 0], 3, step=step).indices.tolist()
            == gfs.select(U, Y[:, 0].contiguous(), 3, step=step).indices.tolist()
        )


BAD = {
    "meta features": (lambda U, y: (U.to("meta"), y), ValueError, "features is on the meta device"),
    "meta targets": (lambda U, y: (U, y.to("meta")), ValueError, "targets is on the meta device"),
    "int features": (lambda U, y: (U.to(torch.int32), y), TypeError, "features has dtype torch.int32"),
    "complex targets": (lambda U, y: (U, y.to(torch.complex64)), TypeError, "targets has dtype torch.complex64"),
    "bool numpy": (lambda U, y: (U.numpy() > 0, y), TypeError, "features has dtype bool"),
    "wrong target length": (lambda U, y: (U, y[:7]), ValueError, "targets must have shape (40,)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_name_the_argument(case):
    U, Y = _base()
    change, error, message = BAD[case]
    with pytest.raises(error) as info:
        gfs.select(*change(U, Y[:, 0].clone()), 3)
    assert message in str(info.value)
    assert "(40,) or (40,)" not in str(info.value)


# -- k ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["stream", "gram"])
@pytest.mark.parametrize("k", [2**62, 10**15])
def test_a_k_that_cannot_fit_in_memory_is_refused_before_anything_runs(engine, k):
    U, Y = _base()
    with pytest.raises(ValueError, match=rf"k={k} steps would need .* GiB"):
        gfs.select(U, Y[:, 0], k, engine=engine, backend="cpu")
    with pytest.raises(ValueError, match=rf"k={k} steps would need"):
        gfs.select(GramStats.from_features(U, Y[:, 0]), k=k)


# -- statistics files that lie ----------------------------------------------------------------
def _saved(tmp_path, **changes):
    U, Y = _base()
    path = tmp_path / "stats.pt"
    GramStats.from_features(U, Y[:, 0]).save(path)
    data = torch.load(path, weights_only=True)
    data.update(changes)
    torch.save(data, tmp_path / "forged.pt")
    return tmp_path / "forged.pt"


LIES = {
    "stride-0 G claiming n=10000": (
        dict(
            n=10000,
            G=torch.zeros(1, dtype=torch.float64).expand(10000, 10000),
            b=torch.zeros(1, dtype=torch.float64).expand(10000),
            u_sum=torch.zeros(1, dtype=torch.float64).expand(10000),
        ),
        "G claims shape (10000, 10000) (800,000,000 bytes) but the file holds 8 bytes",
    ),
    "int64 G": (dict(G=torch.zeros(9, 9, dtype=torch.int64)), "G should be torch.float64, got torch.int64"),
    "complex G": (dict(G=torch.zeros(9, 9, dtype=torch.complex128)), "G should be torch.float64"),
    "non-symmetric G": (dict(G=torch.triu(torch.ones(9, 9, dtype=torch.float64))), "G is not symmetric"),
    "negative count": (dict(count=-5), "count = -5 is not a number of entries"),
    "n a bool": (dict(n=True), "n = True is not a positive number"),
    "negative yy": (dict(yy=-1.0), "yy = -1.0 is a sum of squares"),
    "rep out of range": (dict(rep=torch.full((9,), 20, dtype=torch.int64)), "rep is not a partition"),
}


@pytest.mark.parametrize("case", list(LIES))
def test_a_statistics_file_that_lies_is_refused_before_allocating(tmp_path, case):
    changes, message = LIES[case]
    with pytest.raises(ValueError) as info:
        GramStats.load(_saved(tmp_path, **changes))
    assert message in str(info.value)


# -- exact duplicates on the Gram engine ------------------------------------------------------
@pytest.mark.parametrize("step", list(REFERENCE))
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_duplicated_candidates_tie_to_the_lowest_index_on_the_gram_engine(step, backend, one_thread):
    """A duplicated float32 row: BLAS rounded b = U y differently for the two copies and the later
    one won (22 of 40 problems in the audit)."""
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        N, M = int(torch.randint(3, 30, (1,), generator=g)), int(torch.randint(5, 2000, (1,), generator=g))
        U, y = torch.randn(N, M, generator=g), torch.randn(M, generator=g)
        i, j = sorted(torch.randperm(N, generator=g)[:2].tolist())
        U[j] = U[i]
        k = min(N, 5)
        sel = gfs.select(U, y, k, step=step, engine="gram", backend=backend, replacement=False)
        ref = REFERENCE[step](U.double().numpy(), y.double().numpy(), k, replacement=False)[0]
        assert sel.indices.tolist() == list(map(int, ref)), f"seed {seed}: duplicate rows {i}, {j}"


def test_duplicates_are_tracked_through_batches_merge_and_files(tmp_path):
    g = torch.Generator().manual_seed(3)
    U, y = torch.randn(12, 3000, generator=g), torch.randn(3000, generator=g)
    U[7], U[10], U[11] = U[2], U[2], U[5]
    stats = GramStats(12)
    for c in range(0, 3000, 700):
        stats.update(U[:, c : c + 700], y[c : c + 700])
    other = GramStats.from_features(U[:, :100], y[:100])
    stats.merge(other)
    stats.save(tmp_path / "s.pt")
    for s in (stats, GramStats.load(tmp_path / "s.pt")):
        for a, b in ((2, 7), (2, 10), (5, 11)):
            assert torch.equal(s.G[a], s.G[b]) and torch.equal(s.G[:, a], s.G[:, b]) and s.b[a] == s.b[b]
            assert s.G[a, b] == s.G[a, a]
    # rows that differ in one later batch are no longer duplicates
    V = U[:, :50].clone()
    V[10, 3] += 1.0
    stats.update(V, y[:50])
    assert stats.G[2, 2] == stats.G[7, 7] and stats.G[10, 10] != stats.G[2, 2]


# -- host streaming is wired (no GPU needed: the device is faked) -----------------------------
def test_a_gpu_backend_streams_host_features_that_do_not_fit(monkeypatch):
    from gfs.engines.cost import fits_on_device
    from gfs_kernels import host_stream
    from gfs_kernels.torch_ref import TorchBackend

    class FakeGpu(TorchBackend):
        name, device_types = "fake_gpu", ("cuda",)

        def supports(self, device, dtype, engine="stream", step="uniform"):
            return None if torch.device(device).type == "cuda" else "runs on cuda"

    calls = []
    streamed = host_stream.greedy_uniform_streamed

    def on_cpu(backend, U, y, k, replacement, stop_loss, *, device=None, **kw):
        calls.append(device)
        # a small budget: several chunks, so the chunk logic really runs
        plan = host_stream.plan_chunks(*U.shape, U.element_size(), 4 * U.shape[1] * U.element_size())
        return streamed(backend, U, y, k, replacement, stop_loss, device="cpu", plan=plan)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 1 << 30))  # 1 MiB free
    monkeypatch.setattr(host_stream, "greedy_uniform_streamed", on_cpu)
    gfs_kernels.register(FakeGpu())
    try:
        g = torch.Generator().manual_seed(4)
        U, y = torch.randn(64, 8192, generator=g), torch.randn(8192, generator=g)  # 2 MiB: does not fit
        sel = gfs.select(U, y, 6, backend="fake_gpu")
        assert calls == [torch.device("cuda", 0)]
        assert "streamed from host memory" in sel.reason
        assert sel.indices.tolist() == list(map(int, brute_force_uniform(U.double().numpy(), y.double().numpy(), 6)[0]))
        with pytest.raises(ValueError, match="only the uniform rule streams them"):
            gfs.select(U, y, 3, backend="fake_gpu", step="line_search")
        assert fits_on_device(*U.shape, U.dtype, torch.device("cuda", 0), free_bytes=1 << 30)
    finally:
        gfs_kernels._REGISTRY.pop("fake_gpu")


# -- layer statistics -------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [2.0**100, 2.0**-130, 1.0])
@pytest.mark.parametrize("layer", ["linear", "conv3x3"])
def test_layer_statistics_of_any_float32_magnitude(layer, scale):
    """Activations near 1e31 overflowed the float32 products of the layer statistics (NaN)."""
    from gfs.stats import conv2d_contributions, conv2d_stats, linear_contributions, linear_stats

    g = torch.Generator().manual_seed(6)
    if layer == "linear":
        x, w = torch.randn(40, 6, generator=g), torch.randn(5, 6, generator=g)
        xs = (x.double() * scale).float()
        make, contrib = linear_stats, linear_contributions(xs.double(), w.double()).reshape(6, -1)
    else:
        x, w = torch.randn(2, 4, 6, 6, generator=g), torch.randn(3, 4, 3, 3, generator=g)
        xs = (x.double() * scale).float()
        make = lambda x, w: conv2d_stats(x, w, method="offsets", padding=1)  # noqa: E731
        contrib = conv2d_contributions(xs.double(), w.double(), padding=1).reshape(4, -1)
    stats = make(xs, w)  # float32 products
    want = GramStats.from_features(contrib, contrib.sum(0) / contrib.shape[0])  # float64 throughout
    tiny = 1e-6 * float(want.G.diagonal().max())  # (rounding of float32 products, relative to the largest)
    torch.testing.assert_close(stats.G, want.G, rtol=1e-5, atol=tiny)
    torch.testing.assert_close(stats.b, want.b, rtol=1e-5, atol=tiny)
    assert gfs.select(stats, k=3).indices.tolist() == gfs.select(want, k=3).indices.tolist()

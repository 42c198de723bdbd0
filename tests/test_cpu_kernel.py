"""The compiled CPU operators (csrc/cpu/greedy_cpu.cpp) against the float64 reference.

torch.ops.gfs.{prepare, dots, greedy_uniform} on CPU tensors: paths checked step by step with
reference.check_path, gaps against reference.fw_gap, exact ties on integer data, every storage
dtype (half precision compared with the reference on the upcast values), argument errors, and
that nothing passed in is modified.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference as ref
from gfs.engines.uniform import stream_loop as uniform_loop
from gfs_kernels import _ops
from gfs_kernels.base import accumulation_dtype

pytestmark = pytest.mark.skipif(_ops.load_error is not None, reason=f"extension not built: {_ops.load_error}")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (rtol for losses, relative tolerance for gaps) by accumulation dtype
TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-12, 1e-9)}


def greedy(U, y, k, replacement=True, stop_loss=-1.0):
    return torch.ops.gfs.greedy_uniform(U, y, k, replacement, stop_loss)


def problem(N, M, dtype=torch.float32, seed=0):
    """Random U (N x M) in `dtype` and a target near the dense mean, in the accumulation dtype."""
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(N, M, generator=g, dtype=torch.float64).to(dtype)
    acc = accumulation_dtype(dtype)
    y = (U.to(acc).mean(0) + 0.3 * torch.randn(M, generator=g, dtype=torch.float64).to(acc)).contiguous()
    return U, y


def path_gaps(U, y, picks):
    """reference.fw_gap at every z_{t+1} along the given picks, in float64."""
    U = U.double().numpy()
    y = y.double().numpy()
    z = np.zeros(U.shape[1])
    out = []
    for t, j in enumerate(picks):
        z = (t * z + U[j]) / (t + 1)
        out.append(ref.fw_gap(U, y, z))
    return np.array(out)


def check_against_reference(U, y, k, replacement=True, stop_loss=-1.0):
    idx, losses, gaps = greedy(U, y, k, replacement, stop_loss)
    acc = accumulation_dtype(U.dtype)
    rtol, gtol = TOL[acc]
    assert idx.dtype == torch.int64 and losses.dtype == torch.float64 and gaps.dtype == torch.float64
    assert len(idx) == len(losses) == len(gaps) >= 1
    picks = idx.tolist()
    ref.check_path(U.double().numpy(), y.double().numpy(), picks, losses.numpy(), replacement=replacement, rtol=rtol)
    want = path_gaps(U, y, picks)
    scale = 1.0 + np.abs(want).max()
    np.testing.assert_allclose(gaps.numpy(), want, rtol=gtol, atol=gtol * scale)
    return picks, losses, gaps


# -- random problems ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "N,M,k",
    [(13, 29, 9), (37, 101, 40), (1, 7, 5), (11, 1, 20), (3, 45, 12), (200, 257, 30), (129, 1000, 25)],
)
def test_random_paths_match_reference(dtype, N, M, k):
    U, y = problem(N, M, dtype, seed=N * 1000 + M)
    picks, _, _ = check_against_reference(U, y, k)
    assert len(picks) == k
    if N == 1:
        assert picks == [0] * k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_picks_as_the_python_loop_over_the_same_primitives(dtype):
    """The native loop and `uniform_loop` driving gfs::prepare/dots see identical scores."""
    from gfs_kernels import get

    U, y = problem(150, 333, dtype, seed=3)
    for replacement in (True, False):
        idx, losses, gaps = greedy(U, y, 60, replacement)
        loop = uniform_loop(get("cpu"), U, y, 60, replacement, -1.0)
        assert idx.tolist() == loop.indices.tolist()
        torch.testing.assert_close(losses, loop.losses, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(gaps, loop.gaps, rtol=1e-6, atol=1e-9)


def test_first_pick_is_the_single_best_candidate():
    U, y = problem(64, 50, torch.float64, seed=5)
    single = ((y[None, :] - U) ** 2).sum(1)
    assert greedy(U, y, 1)[0].tolist() == [int(torch.argmin(single))]


# -- ties ------------------------------------------------------------------------------------------
def integer_problem(N, M, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    U = torch.randint(-3, 4, (N, M), generator=g).to(torch.float64)
    y = torch.randint(-2, 3, (M,), generator=g).to(torch.float64)
    return U, y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_ties_go_to_the_lowest_index(dtype):
    U, y = integer_problem(300, 173, seed=1)
    # Copies of one row spread over the matrix (both threads' blocks, every alignment mod 32 since
    # M is odd), zero rows, and the single best candidate duplicated far apart.
    U[40] = U[7]
    U[299] = U[7]
    U[[3, 150, 151]] = 0.0
    best = int(torch.argmin(((y[None, :] - U) ** 2).sum(1)))
    U[250] = U[best]
    U[best + 1 if best + 1 != 250 else best + 2] = U[best]
    acc = accumulation_dtype(dtype)
    Ud, yd = U.to(dtype).contiguous(), y.to(acc)
    for replacement in (True, False):
        picks, _, _ = check_against_reference(Ud, yd, 40, replacement)
        assert picks[0] == best
        # the brute-force float64 reference agrees pick for pick on integer data
        want, *_ = ref.brute_force_uniform(U.numpy(), y.numpy(), len(picks), replacement)
        assert picks == want


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_identical_rows_give_bit_identical_dots_at_any_address(dtype):
    g = torch.Generator().manual_seed(2)
    for M in (1, 7, 31, 37, 64, 1001):
        row = torch.randn(M, generator=g, dtype=torch.float64).to(dtype)
        U = row.repeat(203, 1).contiguous()
        r = torch.randn(M, generator=g, dtype=torch.float64).to(accumulation_dtype(dtype))
        e = torch.ops.gfs.dots(U, r)
        assert torch.equal(e, e[:1].expand_as(e)), f"M={M}: rows at different addresses gave different dots"
        # an offset view (storage starts mid-row, other alignment) too
        V = torch.cat([torch.zeros(1, dtype=dtype), U.flatten()])[1:].view(203, M)
        assert torch.equal(torch.ops.gfs.dots(V, r), e)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_equal_candidates(dtype):
    U = torch.ones(50, 33, dtype=dtype)
    y = torch.zeros(33, dtype=accumulation_dtype(dtype))
    assert greedy(U, y, 7)[0].tolist() == [0] * 7
    assert greedy(U, y, 7, replacement=False)[0].tolist() == list(range(7))


# -- replacement, stopping -------------------------------------------------------------------------
def test_k_greater_than_n_with_replacement():
    U, y = problem(4, 19, seed=7)
    picks, _, _ = check_against_reference(U, y, 30)
    assert len(picks) == 30 and set(picks) <= set(range(4))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_replacement_picks_each_candidate_once(dtype):
    U, y = problem(23, 40, dtype, seed=11)
    picks, _, _ = check_against_reference(U, y, 23, replacement=False)
    assert sorted(picks) == list(range(23))


def test_stop_loss_stops_after_the_first_step_below_it():
    U, y = problem(60, 80, seed=13)
    _, full, _ = greedy(U, y, 20)
    below = (full <= full[5]).nonzero()[0, 0].item()  # first step with loss <= the step-5 loss
    idx, losses, gaps = greedy(U, y, 20, True, float(full[5]))
    assert len(idx) == len(losses) == len(gaps) == below + 1
    torch.testing.assert_close(losses, full[: below + 1], rtol=0, atol=0)
    check_against_reference(U, y, 20, stop_loss=float(full[5]))
    # a stop loss reached at the first step gives one step (and its gap)
    assert len(greedy(U, y, 20, True, 1e30)[0]) == 1


# -- the primitives --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,M", [(1, 1), (5, 3), (33, 70), (130, 1027)])
def test_prepare_and_dots(dtype, N, M):
    U, y = problem(N, M, dtype, seed=17)
    U64, y64 = U.double(), y.double()
    norms, b = torch.ops.gfs.prepare(U, y)
    e = torch.ops.gfs.dots(U, y)
    acc = accumulation_dtype(dtype)
    assert norms.dtype == b.dtype == e.dtype == acc and norms.shape == b.shape == e.shape == (N,)
    tol = dict(rtol=1e-5, atol=1e-5 * M) if acc == torch.float32 else dict(rtol=1e-12, atol=1e-12 * M)
    torch.testing.assert_close(norms.double(), (U64 * U64).sum(1), **tol)
    torch.testing.assert_close(b.double(), U64 @ y64, **tol)
    torch.testing.assert_close(e.double(), U64 @ y64, **tol)


# -- arguments -------------------------------------------------------------------------------------
def test_bad_arguments_have_clear_errors():
    U, y = problem(6, 10)
    with pytest.raises(RuntimeError, match="U must be 2-D"):
        greedy(U.flatten(), y, 2)
    with pytest.raises(RuntimeError, match="U must be contiguous"):
        greedy(U.t().contiguous().t(), torch.zeros(6), 2)
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        greedy(U.to(torch.int32), y, 2)
    with pytest.raises(RuntimeError, match="y has length 9 but U has M = 10"):
        greedy(U, y[:9], 2)
    with pytest.raises(RuntimeError, match="y must be 1-D"):
        greedy(U, y[None], 2)
    with pytest.raises(RuntimeError, match="y must be Float for BFloat16 U"):
        greedy(U.bfloat16(), y.bfloat16(), 2)
    with pytest.raises(RuntimeError, match="y must be Double for Double U"):
        greedy(U.double(), y, 2)
    with pytest.raises(RuntimeError, match="k must be >= 1, got 0"):
        greedy(U, y, 0)
    with pytest.raises(RuntimeError, match="k = 7 exceeds the N = 6 candidates"):
        greedy(U, y, 7, replacement=False)
    with pytest.raises(RuntimeError, match="at least one row"):
        greedy(U[:0], y, 1)
    with pytest.raises(RuntimeError, match="r has length 9"):
        torch.ops.gfs.dots(U, y[:9])
    with pytest.raises(RuntimeError, match="U must be 2-D"):
        torch.ops.gfs.prepare(U[0], y)
    assert len(greedy(U, y, 6, replacement=False)[0]) == 6  # k == N is allowed


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inputs_are_not_modified(dtype):
    U, y = problem(40, 50, dtype, seed=19)
    U0, y0 = U.clone(), y.clone()
    greedy(U, y, 30, False)
    greedy(U, y, 30, True, 0.5)
    torch.ops.gfs.prepare(U, y)
    torch.ops.gfs.dots(U, y)
    assert torch.equal(U, U0) and torch.equal(y, y0)

"""torch.library.opcheck on every custom operator: the schemas in csrc/ops.cpp, the CPU kernels
registered under them, and the fake implementations in gfs_kernels/_ops.py, on small CPU inputs
in every dtype each operator takes.

Every case runs all four of opcheck's test_utils; none is skipped, and this is why each is valid
for these operators:

- test_schema: the operators are functional (no input is mutated or returned as an output); it
  checks that the kernels honour that.
- test_autograd_registration: opcheck returns at once unless an input requires grad, so every
  operator also gets inputs that do. The operators are not differentiable and are registered as
  Autograd fallthroughs (csrc/ops.cpp): their outputs never require grad.
- test_faketensor: compares the fake implementation's outputs with the kernel's (dtype, device,
  rank, sizes, strides). greedy_uniform and gram_greedy return s <= k steps, a data-dependent
  number (the stop_loss rule); their fakes make s an unbacked SymInt in [1, k]
  (ctx.new_dynamic_size), and opcheck accepts an unbacked size on the fake side
  (compare_tensor_meta(allow_rhs_unbacked=True)) while still checking everything else, the
  fixed-size (N,) weights of gram_greedy included. (The operators carry no dynamic_output_shape
  tag, which would make opcheck skip this comparison.) The cases that stop before k steps are what
  catch a fake that returns k steps.
- test_aot_dispatch_dynamic: AOTAutograd traces each operator with dynamic shapes and compares
  the compiled outputs with eager ones; the data-dependent s stays an unbacked size that nothing
  in the graph guards on, so it is valid for greedy_uniform and gram_greedy too. (The compiled
  graph runs the real kernel, so it checks traceability, not the fake's dtypes: test_faketensor
  does that.)
"""

from __future__ import annotations

import pytest
import torch

from gfs_kernels import _ops
from gfs_kernels.base import accumulation_dtype

pytestmark = pytest.mark.skipif(_ops.load_error is not None, reason=f"extension not built: {_ops.load_error}")

TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
# the storage dtypes of U that prepare, dots and greedy_uniform take (y and r in the accumulation
# dtype: float64 for float64 U, else float32); gram_greedy takes float64 G and b only
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
N, M = 6, 5


def problem(dtype, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(N, M, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(M, generator=g, dtype=torch.float64).to(accumulation_dtype(dtype))
    return U.requires_grad_(grad), y.requires_grad_(grad)


def check(op, args):
    opcheck_result = torch.library.opcheck(op, args, test_utils=TEST_UTILS)
    assert opcheck_result == dict.fromkeys(TEST_UTILS, "SUCCESS"), opcheck_result
    outs = op(*args)
    assert not any(t.requires_grad for t in (outs if isinstance(outs, tuple) else (outs,)))
    return outs


@pytest.mark.parametrize("grad", [False, True], ids=["plain", "requires_grad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prepare(dtype, grad):
    check(torch.ops.gfs.prepare.default, problem(dtype, grad))


@pytest.mark.parametrize("grad", [False, True], ids=["plain", "requires_grad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dots(dtype, grad):
    check(torch.ops.gfs.dots.default, problem(dtype, grad))


def _uniform_cases(U, y):
    """(k, replacement, stop_loss, steps taken): full runs, runs stopped early by stop_loss (one
    step; a middle step), without replacement up to k = N, and k > N with replacement."""
    _, losses, _ = torch.ops.gfs.greedy_uniform(U.detach(), y.detach(), 4, True, -1.0)
    middle = float(losses[1])  # stops at the first step whose loss <= this: step 2 or earlier
    return [
        (4, True, -1.0, 4),
        (4, True, 1e30, 1),
        (4, True, middle, None),
        (N, False, -1.0, N),
        (N + 3, True, -1.0, N + 3),
    ]


@pytest.mark.parametrize("grad", [False, True], ids=["plain", "requires_grad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_greedy_uniform(dtype, grad):
    U, y = problem(dtype, grad)
    for k, replacement, stop_loss, steps in _uniform_cases(U, y):
        idx, losses, gaps = check(torch.ops.gfs.greedy_uniform.default, (U, y, k, replacement, stop_loss))
        s = idx.shape[0]
        assert (s == steps) if steps is not None else (1 <= s <= 2)
        assert losses.shape == gaps.shape == (s,)


def _gram(grad, seed=0):
    U, y = problem(torch.float64, seed=seed)
    G, b = (U @ U.T).requires_grad_(grad), (U @ y).requires_grad_(grad)
    return G, b, float(y @ y), M


@pytest.mark.parametrize("grad", [False, True], ids=["plain", "requires_grad"])
@pytest.mark.parametrize("step", ["uniform", "line_search", "refit"])
def test_gram_greedy(step, grad):
    G, b, yy, count = _gram(grad)
    tol = 1e-9
    full = torch.ops.gfs.gram_greedy(G.detach(), b.detach(), yy, count, 4, step, True, -1.0, tol)
    middle = float(full[1][1])
    cases = [(4, True, -1.0, 4), (4, True, 1e30, 1), (4, True, middle, None), (N, False, -1.0, N)]
    for k, replacement, stop_loss, steps in cases:
        args = (G, b, yy, count, k, step, replacement, stop_loss, tol)
        idx, losses, gaps, gammas, weights = check(torch.ops.gfs.gram_greedy.default, args)
        s = idx.shape[0]
        assert (s == steps) if steps is not None else (1 <= s <= 2)
        assert losses.shape == gaps.shape == gammas.shape == (s,) and weights.shape == (N,)

"""The "triton" backend's kernels under the Triton interpreter, on CPU tensors, against the
float64 brute-force reference (tests/reference.py).

Run by tests/test_gpu_kernels.py in a subprocess, because TRITON_INTERPRET=1 must be set before
triton is first imported. Prints one JSON line per case: {"case", "ok", "error", "seconds"}.

    TRITON_INTERPRET=1 PYTHONPATH=python:src:tests python tests/triton_interpret_check.py [case ...]
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from reference import brute_force_uniform, check_path  # noqa: E402

assert os.environ["TRITON_INTERPRET"] == "1"
from gfs_kernels import get, triton_step  # noqa: E402

B = get("triton")
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _well_separated(N, M, dtype, seed):
    """Random candidates and a target near the mean of a few of them: distinct losses."""
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(N, M, generator=g, dtype=torch.float64)
    y = U[: max(2, N // 10)].mean(0) + 0.05 * torch.randn(M, generator=g, dtype=torch.float64)
    return U.to(dtype), y.to(_acc(dtype))


def _run(U, y, k, replacement=True, stop_loss=-1.0):
    res = B.greedy_uniform(U, y, k, replacement, stop_loss)
    return res.indices.tolist(), res.losses.numpy(), res.gaps.numpy(), res


def _compare(U, y, k, replacement=True, stop_loss=-1.0, exact_picks=True, gap_rtol=1e-4):
    picks, losses, gaps, _ = _run(U, y, k, replacement, stop_loss)
    U64, y64 = U.double().numpy(), y.double().numpy()
    rp, rl, rg, _ = brute_force_uniform(U64, y64, k, replacement, stop_loss)
    if exact_picks:
        assert picks == rp, f"picks {picks} != reference {rp}"
    assert len(picks) == len(rp), f"{len(picks)} steps, reference {len(rp)}"
    check_path(U64, y64, picks, losses, replacement=replacement)
    assert len(gaps) == len(rg), f"{len(gaps)} gaps, reference {len(rg)}"
    scale = max(1.0, float(np.abs(rg).max()))
    assert np.allclose(gaps, rg, rtol=gap_rtol, atol=gap_rtol * scale), f"gaps {gaps} vs {rg}"
    return picks


@case
def float32_well_separated():
    U, y = _well_separated(70, 300, torch.float32, 0)
    _compare(U, y, 12)


@case
def bfloat16_well_separated():
    U, y = _well_separated(70, 300, torch.bfloat16, 1)
    _compare(U, y, 12)


@case
def float16_and_float64_small():
    for dt, seed in ((torch.float16, 2), (torch.float64, 3)):
        U, y = _well_separated(33, 100, dt, seed)
        _compare(U, y, 6, gap_rtol=1e-3 if dt == torch.float16 else 1e-9)


@case
def ragged_shapes_and_tiny():
    """N, M not multiples of the tiles / splits, and N = 1, M = 1."""
    for N, M, k, seed in ((37, 77, 5, 4), (17, 33, 4, 5), (1, 9, 3, 6), (9, 1, 4, 7)):
        U, y = _well_separated(N, M, torch.float32, seed)
        _compare(U, y, k, exact_picks=M > 1)


def _integer_ties(N, M, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    U = torch.randint(-3, 4, (N, M), generator=g).double()
    U[N // 2] = U[3]  # duplicates: the lower index must win
    U[N - 1] = U[0]
    U[5] = 0.0  # zero rows
    U[N // 3] = 0.0
    y = torch.randint(-3, 4, (M,), generator=g).double()
    return U.to(dtype), y.to(_acc(dtype))


@case
def integer_ties_float32():
    U, y = _integer_ties(61, 140, 8)
    picks = _compare(U, y, 12)
    assert 60 not in picks, "duplicate of row 0 picked instead of row 0"


@case
def integer_ties_bfloat16():
    U, y = _integer_ties(40, 96, 9, torch.bfloat16)  # small integers are exact in bfloat16
    _compare(U, y, 10)


@case
def all_equal_candidates():
    """Every candidate identical: every step must pick index 0 (with replacement) or 0, 1, 2...
    (without). N = 70 spans several chunks of the select kernel (32 under the interpreter)."""
    U = torch.ones(70, 40)
    y = torch.full((40,), 2.0)
    assert _run(U, y, 5)[0] == [0] * 5
    assert _run(U, y, 5, replacement=False)[0] == [0, 1, 2, 3, 4]


@case
def no_replacement():
    U, y = _integer_ties(45, 120, 10)
    picks = _compare(U, y, 12, replacement=False)
    assert len(set(picks)) == len(picks)
    U, y = _well_separated(30, 64, torch.bfloat16, 11)
    _compare(U, y, 12, replacement=False)


@case
def stop_loss():
    U, y = _well_separated(50, 120, torch.float32, 12)
    _, rl, _, _ = brute_force_uniform(U.double().numpy(), y.double().numpy(), 10)
    stop = float(rl[3]) * (1 + 1e-9)  # reached at step 3: four steps, four gaps
    picks, losses, gaps, _ = _run(U, y, 10, True, stop)
    assert len(picks) == 4 and len(losses) == 4 and len(gaps) == 4, (len(picks), len(gaps))
    _compare(U, y, 10, stop_loss=stop)
    picks, _, gaps, _ = _run(U, y, 10, True, 1e9)  # reached at once
    assert len(picks) == 1 and len(gaps) == 1


@case
def k_zero_and_k_above_n():
    U, y = _well_separated(8, 40, torch.float32, 13)
    picks, losses, gaps, _ = _run(U, y, 0)
    rp, _, _, _ = brute_force_uniform(U.double().numpy(), y.double().numpy(), 1)
    assert picks == [] and len(losses) == 0 and len(gaps) == 1  # like base.uniform_loop
    b = U.double() @ y.double()
    assert abs(gaps[0] - 2 * float(b.max()) / 40) < 1e-4 * max(1.0, abs(gaps[0]))
    _compare(U, y, 11)  # k > N with replacement


@case
def prepare_and_dots():
    for dt in (torch.float32, torch.bfloat16):
        U, y = _well_separated(70, 300, dt, 14)
        norms, b = B.prepare(U, y)
        U64 = U.double()
        assert torch.allclose(norms.double(), (U64 * U64).sum(1), rtol=1e-5)
        assert torch.allclose(b.double(), U64 @ y.double(), rtol=1e-4, atol=1e-4)
        r = torch.randn(300, generator=torch.Generator().manual_seed(15))
        e = B.dots(U, r)
        ref = U64 @ r.double()
        assert float((e.double() - ref).norm() / ref.norm()) < 1e-5


@case
def deterministic():
    U, y = _well_separated(70, 300, torch.float32, 16)
    a = _run(U, y, 6)
    b = _run(U, y, 6)
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])


@case
def host_stream_with_triton_dots():
    from gfs_kernels.host_stream import greedy_uniform_streamed, plan_chunks

    U, y = _integer_ties(50, 96, 17)
    plan = plan_chunks(50, 96, 4, 2 * 7 * 96 * 4)  # chunks of 7 rows: ties across chunk borders
    res = greedy_uniform_streamed(B, U, y, 8, False, -1.0, device="cpu", plan=plan)
    rp, rl, rg, _ = brute_force_uniform(U.double().numpy(), y.double().numpy(), 8, False)
    assert res.indices.tolist() == rp, (res.indices.tolist(), rp)
    assert np.allclose(res.losses.numpy(), rl) and np.allclose(res.gaps.numpy(), rg, rtol=1e-5, atol=1e-6)


@case
def supports_cpu_under_interpreter():
    assert B.supports(torch.device("cpu"), torch.float32) is None
    assert B.supports(torch.device("cpu"), torch.bfloat16) is None
    assert triton_step.INTERPRET


def main(names):
    names = names or list(CASES)
    failed = 0
    for name in names:
        t0 = time.perf_counter()
        try:
            CASES[name]()
            ok, err = True, ""
        except Exception:  # noqa: BLE001 - reported to the parent test
            ok, err = False, traceback.format_exc()
            failed += 1
        print(
            json.dumps({"case": name, "ok": ok, "error": err, "seconds": round(time.perf_counter() - t0, 2)}),
            flush=True,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

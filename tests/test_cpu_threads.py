"""The CPU uniform loop has no per-step barrier (csrc/cpu/greedy_cpu.cpp, issue 16 item 2): threads
claim chunks of rows, a thread that waits too long on another's chunk computes it itself, and a
thread that was descheduled catches up from the published picks. Whatever the thread count, the
machine's load or which thread computed what, the picks, losses and gaps are bit-identical to
one thread's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gfs_kernels import _ops
from gfs_kernels.base import accumulation_dtype

pytestmark = pytest.mark.skipif(_ops.load_error is not None, reason=f"extension not built: {_ops.load_error}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def problem(N, M, dtype, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # small integers: exact ties between distinct candidates, duplicates far apart
        U = torch.randint(-2, 3, (N, M), generator=g).double()
        U[N - 1] = U[3]
        U[N // 2] = U[3]
    else:
        U = torch.randn(N, M, generator=g, dtype=torch.float64)
    acc = accumulation_dtype(dtype)
    y = (U[: N // 4].mean(0) + 0.3 * torch.randn(M, generator=g, dtype=torch.float64)).to(acc)
    return U.to(dtype).contiguous(), y


def run(U, y, k, replacement=True, stop_loss=-1.0, threads=1):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return torch.ops.gfs.greedy_uniform(U, y, k, replacement, stop_loss)
    finally:
        torch.set_num_threads(before)


def assert_identical(a, b):
    for x, z in zip(a, b, strict=True):
        assert torch.equal(x, z), (x, z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("replacement", [True, False])
def test_every_thread_count_gives_one_threads_bits(dtype, replacement):
    # 600 rows of 2 KiB-16 KiB: dozens of chunks a pass for 2+ threads
    U, y = problem(600, 2048, dtype, seed=1)
    k = 150
    want = run(U, y, k, replacement)
    for threads in (2, 3, 4, 7):  # more threads than cores too: threads are descheduled mid-pass
        assert_identical(run(U, y, k, replacement, threads=threads), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ties_and_duplicates_go_to_the_lowest_index_on_any_thread_count(dtype):
    U, y = problem(800, 1031, dtype, seed=2, ties=True)  # odd M: every row at another alignment
    N = len(U)
    for replacement in (True, False):
        want = run(U, y, 60, replacement)
        for threads in (2, 4):
            assert_identical(run(U, y, 60, replacement, threads=threads), want)
        picks = want[0].tolist()
        if replacement:  # copies of row 3 tie with it at every step: row 3 wins
            assert N // 2 not in picks and N - 1 not in picks
        else:  # each copy only after the lower ones are taken
            for lower, upper in ((3, N // 2), (N // 2, N - 1)):
                if upper in picks:
                    assert lower in picks and picks.index(lower) < picks.index(upper)


def test_stop_loss_and_k_larger_than_n_on_threads():
    U, y = problem(300, 4096, torch.float32, seed=3)
    full = run(U, y, 40)
    stop = float(full[1][7])
    want = run(U, y, 40, True, stop)
    assert len(want[0]) == 8
    for threads in (2, 3):
        assert_identical(run(U, y, 40, True, stop, threads=threads), want)
    assert_identical(run(U, y, 700, threads=2), run(U, y, 700))  # k > N, with replacement


_BUSY = """
import subprocess, sys, torch
sys.path[:0] = {paths!r}
import gfs_kernels
spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range({spinners})]
try:
    g = torch.Generator().manual_seed(5)
    U = torch.randn(2000, 1024, generator=g)
    y = U[:300].mean(0) + 0.1 * torch.randn(1024, generator=g)
    torch.set_num_threads(1)
    want = torch.ops.gfs.greedy_uniform(U, y, 300, True, -1.0)
    for threads in (2, 4):
        torch.set_num_threads(threads)
        for _ in range(3):
            got = torch.ops.gfs.greedy_uniform(U, y, 300, True, -1.0)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), threads
    print("identical")
finally:
    for p in spin:
        p.kill()
        p.wait()
"""


@pytest.mark.parametrize("spinners", [1, 2])
def test_identical_while_other_processes_hold_the_cores(spinners):
    """Threads descheduled at random points (other processes spinning on the cores): the helping
    and catching-up paths run, and the result is still one thread's, bit for bit."""
    code = textwrap.dedent(
        _BUSY.format(paths=[os.path.join(ROOT, "python"), os.path.join(ROOT, "src")], spinners=spinners)
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "identical" in proc.stdout, proc.stderr[-2000:]

"""The native loops are safe to call with any k and stop on Ctrl-C (docs/design.md section 3: native
code never throws across an OpenMP region, checks for interrupts, and allocates nothing whose size
it has not checked first).

A k whose outputs cannot exist is a clean RuntimeError naming k (it used to be std::bad_alloc
inside an OpenMP region, i.e. SIGABRT, or `ValueError: vector::reserve`), and SIGINT stops a
running selection within a fraction of a second with a real KeyboardInterrupt (it used to run on
until SIGKILL).
"""

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from gfs_kernels import _ops

pytestmark = pytest.mark.skipif(_ops.load_error is not None, reason=str(_ops.load_error))

HUGE = 2**62


def _gram_inputs(n=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    U = torch.randn(n, 16, generator=g, dtype=dtype)
    y = torch.randn(16, generator=g, dtype=dtype)
    return U @ U.T, U @ y, float(y @ y), 16


# ---------------------------------------------------------------------------------------------
# (a) a huge k is refused up front, cleanly, naming k


@pytest.mark.parametrize("k", [HUGE, 10**12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_greedy_uniform_refuses_a_k_its_outputs_cannot_hold(k, dtype):
    U, y = torch.randn(8, 16, dtype=dtype), torch.randn(16, dtype=dtype)
    with pytest.raises(RuntimeError, match=rf"k = {k} steps need .* bytes a step"):
        torch.ops.gfs.greedy_uniform(U, y, k, True, -1.0)


@pytest.mark.parametrize("k", [HUGE, 10**12])
@pytest.mark.parametrize("step", ["uniform", "line_search", "refit"])
def test_gram_greedy_refuses_a_k_its_outputs_cannot_hold(k, step):
    G, b, yy, count = _gram_inputs()
    with pytest.raises(RuntimeError, match=rf"k = {k} steps need .* bytes a step"):
        torch.ops.gfs.gram_greedy(G, b, yy, count, k, step, True, -1.0, 1e-12)


def test_outputs_of_an_early_stop_are_not_views_of_the_k_sized_buffers():
    # The outputs are allocated for k steps before the loop; a loop that stops early returns
    # copies of what it wrote, not views that would keep the k-sized buffers alive.
    U, y = torch.randn(8, 16), torch.randn(16)
    idx, losses, gaps = torch.ops.gfs.greedy_uniform(U, y, 10**6, True, 1e30)  # stops after step 0
    assert idx.shape == losses.shape == gaps.shape == (1,)
    for t in (idx, losses, gaps):
        assert t.untyped_storage().nbytes() == 8
    G, b, yy, count = _gram_inputs()
    out = torch.ops.gfs.gram_greedy(G, b, yy, count, 10**6, "uniform", True, 1e30, 1e-12)
    for t in out[:4]:
        assert t.shape == (1,) and t.untyped_storage().nbytes() == 8
    assert float(out[4].sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("step", ["uniform", "line_search", "refit"])
def test_gram_greedy_full_length_run_is_unchanged_by_preallocation(step):
    # k steps taken exactly: the outputs are the preallocated tensors themselves.
    G, b, yy, count = _gram_inputs(n=12)
    out = torch.ops.gfs.gram_greedy(G, b, yy, count, 12, step, False, -1.0, 1e-12)
    assert out[0].shape == (12,)
    assert sorted(out[0].tolist()) == list(range(12))  # without replacement: each once


# ---------------------------------------------------------------------------------------------
# (b) Ctrl-C stops a running native loop with KeyboardInterrupt

_CHILD = """
import os, sys, traceback
import torch
{setup}
print("started", flush=True)
try:
    {call}
    print("finished", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    traceback.print_exc()
    # the op is usable again in the same process
    r = torch.ops.gfs.greedy_uniform(torch.randn(8, 16), torch.randn(16), 3, True, -1.0)
    print("again", r[0].numel(), flush=True)
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)  # skip the interpreter's teardown (slow on a busy machine): it is not under test
"""


class _Lines:
    """The lines of a pipe, read by a thread (a select() on the pipe would miss lines that the
    file object already buffered)."""

    def __init__(self, pipe):
        self.queue, self.lines = queue.Queue(), []
        self.thread = threading.Thread(target=self._run, args=(pipe,), daemon=True)
        self.thread.start()

    def _run(self, pipe):
        for line in pipe:
            self.queue.put(line.rstrip("\n"))
        self.queue.put(None)

    def next(self, timeout):
        """The next line, or None after `timeout` seconds or at the end."""
        try:
            line = self.queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if line is not None:
            self.lines.append(line)
        return line

    def rest(self, timeout):
        """Every line seen, after waiting up to `timeout` seconds for the end of the pipe."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.next(max(0.0, deadline - time.monotonic())) is None:
                break
        return "\n".join(self.lines)


_GRAM_SETUP = (
    "import gfs_kernels; U = torch.randn({n}, 16, dtype=torch.float64); y = torch.randn(16, dtype=torch.float64); "
    "G, b = U @ U.T, U @ y"
)
_GRAM_CALL = "torch.ops.gfs.gram_greedy(G, b, float(y @ y), 16, 10**8, '{step}', True, -1.0, 1e-12)"

CASES = {
    # the reproducer through gfs.select, one thread (64 x 256 is below the threading
    # threshold): 10**7 steps of ~2 us take tens of seconds, and their outputs fit in memory
    "select-cpu-1-thread": (
        "import gfs; U, y = torch.randn(64, 256), torch.randn(256)",
        "gfs.select(U, y, 10**7, backend='cpu')",
    ),
    # large enough for every OpenMP thread: all of them must leave the loop at the same step
    "greedy_uniform-threads": (
        "import gfs_kernels; U, y = torch.randn(512, 256), torch.randn(256)",
        "torch.ops.gfs.greedy_uniform(U, y, 10**7, True, -1.0)",
    ),
    # the Gram loop, called directly (gfs.select's own memory check is not under test); N = 1024
    # makes a step cost a microsecond or more, so that 10**8 steps take minutes
    "gram-uniform": (_GRAM_SETUP.format(n=1024), _GRAM_CALL.format(step="uniform")),
    "gram-refit": (_GRAM_SETUP.format(n=256), _GRAM_CALL.format(step="refit")),
}


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
@pytest.mark.parametrize("case", list(CASES))
def test_sigint_stops_a_running_native_loop(case):
    setup, call = CASES[case]
    code = _CHILD.format(setup=setup, call=call)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    out, err = _Lines(proc.stdout), _Lines(proc.stderr)
    try:
        # generous: importing torch on a busy 2-core machine can take long
        started = out.next(120)
        assert started == "started", f"the child did not start: {started!r}\n{err.rest(5)}"
        time.sleep(1.5)  # well inside the native loop (it would run for a minute or more)
        assert proc.poll() is None, "the child ended before the interrupt"
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        line = out.next(30)
        latency = time.monotonic() - sent
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout, stderr = out.rest(10), err.rest(10)
    assert line == "interrupted", f"no KeyboardInterrupt after SIGINT (got {line!r}); stderr:\n{stderr[-2000:]}"
    assert "finished" not in stdout
    assert latency < 5.0, f"the loop took {latency:.2f} s to stop (polled every 50 ms)"
    assert "KeyboardInterrupt" in stderr
    # raised from inside the op call (torch.ops), not from Python code around it
    frames = [ln for ln in stderr.splitlines() if ln.lstrip().startswith("File ")]
    assert frames and "_ops.py" in frames[-1], stderr[-2000:]
    assert "again 3" in stdout, stdout  # nothing left broken: the op runs again
    assert proc.returncode == 0  # not killed (SIGKILL / SIGABRT)

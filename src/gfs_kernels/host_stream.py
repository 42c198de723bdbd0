"""Greedy selection when U does not fit in device memory: stream it from pinned host memory.

U stays on the host (row-major, so a block of rows is one contiguous copy). Every step streams
it through two device buffers: while the backend's `dots` runs on chunk c on the compute stream,
chunk c+1 is copied on a second stream (double buffering; events order the reuse of a buffer).
Each chunk's scores give a chunk winner on the device; the running best (score, index, row) is
kept on the device too, so the chosen row is already there when the step ends and no step
needs the host to know j*. The rest of the step (the O(N) + O(M) update, the exact float64 loss,
the gap) is a few small device operations. Used by both GPU backends (they only provide
`dots`); the planner (gfs.engines.plan) streams only when U does not fit in the device's free
memory (gfs.engines.cost.fits_on_device).

Without a stop loss nothing is read back until the end. With one, the host reads the step's
loss once per step (a step is bound by the PCIe transfer of all of U, so that wait is small).

The same code runs with device="cpu" (no streams, no copies): that is how the chunk logic is
tested without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Backend, LoopResult, accumulation_dtype

HEADROOM = 0.9  # use at most this fraction of the free device memory
TARGET_CHUNK_BYTES = 256 << 20  # small enough for several chunks in flight, large enough for full PCIe speed


def workspace_bytes(N: int, M: int, dtype: torch.dtype) -> int:
    """Device memory a device-resident greedy call needs besides U (both GPU backends): float64
    S and the losses, q and y in the accumulation dtype, split partials (at most 64 x N), norms,
    b, the taken mask, plus 64 MiB of slack for the allocator and the kernels' own state."""
    acc = torch.empty((), dtype=accumulation_dtype(dtype)).element_size()
    return 8 * M + 3 * acc * M + (64 + 4) * acc * N + N + (64 << 20)


@dataclass(frozen=True)
class ChunkPlan:
    """N rows of U in `n_chunks` row chunks of nearly equal size (they differ by at most one
    row), streamed through `buffers` device buffers of `rows` rows each."""

    N: int
    n_chunks: int
    buffers: int
    row_bytes: int

    @property
    def rows(self) -> int:
        """Rows of the largest chunk (the buffer size)."""
        return -(-self.N // self.n_chunks)

    @property
    def buffer_bytes(self) -> int:
        return self.rows * self.row_bytes

    def ranges(self):
        """(first row, end row) of every chunk, in order."""
        base, extra = divmod(self.N, self.n_chunks)
        out, i = [], 0
        for c in range(self.n_chunks):
            n = base + (1 if c < extra else 0)
            out.append((i, i + n))
            i += n
        return out


def plan_chunks(
    N: int, M: int, itemsize: int, budget_bytes: int, *, buffers: int = 2, target_chunk_bytes: int = TARGET_CHUNK_BYTES
) -> ChunkPlan:
    """Chunks such that `buffers` chunk buffers fit in `budget_bytes` and a chunk is about
    `target_chunk_bytes` (never more than the budget allows), of nearly equal sizes."""
    if N < 1 or M < 1:
        raise ValueError(f"U must be non-empty, got N={N}, M={M}")
    if buffers < 1:
        raise ValueError("buffers must be >= 1")
    row_bytes = M * itemsize
    max_rows = budget_bytes // (buffers * row_bytes)
    if max_rows < 1:
        raise MemoryError(
            f"{buffers} device buffers of one row of U ({row_bytes / 2**20:.1f} MiB each) do not fit in "
            f"{budget_bytes / 2**20:.1f} MiB of device memory; free device memory or use the Gram engine"
        )
    rows = max(1, min(N, max_rows, target_chunk_bytes // row_bytes))
    return ChunkPlan(N=N, n_chunks=-(-N // rows), buffers=buffers, row_bytes=row_bytes)


def stream_budget(N: int, M: int, dtype: torch.dtype, device: torch.device, *, free_bytes: int | None = None) -> int:
    """Device bytes left for the chunk buffers: the free memory's headroom minus the workspace
    and the running best row."""
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    itemsize = torch.empty((), dtype=dtype).element_size()
    return int(HEADROOM * free_bytes) - workspace_bytes(N, M, dtype) - M * itemsize


def _host_mode(U: torch.Tensor, device: torch.device) -> str:
    """How chunks leave the host: straight from U when it is pinned, else through two pinned
    staging buffers (a host copy into one while the other uploads). Pin U once with
    `U.pin_memory()` (if the host has the memory twice over) to skip the staging copy.
    (cudaHostRegister in place is not used: on failure it leaves a sticky "last error" that
    torch.cuda cannot clear, which a later kernel-launch check would report.)"""
    if device.type != "cuda":
        return "cpu run, no copies"
    return "pinned" if U.is_pinned() else "staged through pinned buffers"


class _Streamer:
    """Runs `fn(chunk_on_device, i0, i1)` for every chunk of U on the compute stream, the copy of
    the next chunk overlapped on a second stream (two buffers)."""

    def __init__(self, U: torch.Tensor, plan: ChunkPlan, device: torch.device, mode: str):
        self.U, self.plan, self.device, self.mode = U, plan, device, mode
        self.cuda = device.type == "cuda"
        if self.cuda:
            shape = (plan.rows, U.shape[1])
            self.bufs = [torch.empty(shape, dtype=U.dtype, device=device) for _ in range(plan.buffers)]
            self.copied = [torch.cuda.Event() for _ in range(plan.buffers)]
            self.consumed = [torch.cuda.Event() for _ in range(plan.buffers)]
            self.copy_stream = torch.cuda.Stream(device)
            self.staging = None
            if mode.startswith("staged"):
                self.staging = [torch.empty(shape, dtype=U.dtype, pin_memory=True) for _ in range(plan.buffers)]
        self.bytes_copied = 0

    def run(self, fn):
        if not self.cuda:  # cpu: the chunks are views of U
            for i0, i1 in self.plan.ranges():
                fn(self.U[i0:i1], i0, i1)
            return
        compute = torch.cuda.current_stream(self.device)
        for idx, (i0, i1) in enumerate(self.plan.ranges()):
            slot = idx % self.plan.buffers
            n = i1 - i0
            src = self.U[i0:i1]
            if self.staging is not None:
                self.copied[slot].synchronize()  # the staging buffer's last upload is done
                self.staging[slot][:n].copy_(src)
                src = self.staging[slot][:n]
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.consumed[slot])  # the compute is done with it
                self.bufs[slot][:n].copy_(src, non_blocking=True)
                self.copied[slot].record(self.copy_stream)
            compute.wait_event(self.copied[slot])
            fn(self.bufs[slot][:n], i0, i1)
            self.consumed[slot].record(compute)
            self.bytes_copied += n * self.plan.row_bytes


def greedy_uniform_streamed(
    backend: Backend,
    U: torch.Tensor,
    y: torch.Tensor,
    k: int,
    replacement: bool,
    stop_loss: float,
    *,
    device: torch.device | str | None = None,
    plan: ChunkPlan | None = None,
    free_bytes: int | None = None,
) -> LoopResult:
    """The uniform rule (same results as gfs.engines.uniform.stream_loop) with U on the host, streamed to
    `device` in row chunks every step. `backend` provides `dots` on the device."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    U = U.contiguous()
    N, M = U.shape
    acc = accumulation_dtype(U.dtype)
    if plan is None:
        if device.type == "cuda":
            budget = stream_budget(N, M, U.dtype, device, free_bytes=free_bytes)
        else:
            budget = 2 * TARGET_CHUNK_BYTES
        plan = plan_chunks(N, M, U.element_size(), budget)
    inf = float("inf")
    f64 = dict(dtype=torch.float64, device=device)

    y_acc = y.to(device=device, dtype=acc)
    y64 = y_acc.double()
    mode = _host_mode(U, device)
    streamer = _Streamer(U, plan, device, mode)

    # prepare: norms and b, one pass
    norms = torch.empty(N, dtype=acc, device=device)
    b = torch.empty(N, dtype=acc, device=device)

    def prep(chunk, i0, i1):
        nrm, bb = backend.prepare(chunk, y_acc)
        norms[i0:i1] = nrm
        b[i0:i1] = bb

    streamer.run(prep)
    norms64 = norms.double()

    q = y_acc.clone()
    S = torch.zeros(M, **f64)
    rz = torch.zeros((), **f64)
    taken = torch.zeros(N, dtype=torch.bool, device=device)
    picks = torch.full((max(k, 1),), -1, dtype=torch.int64, device=device)
    losses = torch.full((max(k, 1),), float("nan"), **f64)
    gaps = torch.full((max(k, 1),), float("nan"), **f64)
    best = torch.empty((), **f64)
    best_j = torch.zeros((), dtype=torch.int64, device=device)
    best_row = torch.zeros(M, dtype=U.dtype, device=device)
    emax = torch.empty((), **f64)

    def scan(t: int, select: bool):
        best.fill_(inf)
        best_j.zero_()
        emax.fill_(-inf)

        def on_chunk(chunk, i0, i1):
            d = backend.dots(chunk, q).double()
            te = d - b[i0:i1].double() if t > 0 else d
            torch.maximum(emax, te.max(), out=emax)
            if not select:
                return
            score = norms64[i0:i1] - 2.0 * d
            if not replacement:
                score = score.masked_fill(taken[i0:i1], inf)
            c = torch.argmin(score).view(1)  # first minimum: the lowest index in the chunk
            sc = score.index_select(0, c)[0]  # (indexing with a device tensor would sync)
            better = sc < best  # strict: an earlier chunk keeps a tie
            best.copy_(torch.where(better, sc, best))
            best_j.copy_(torch.where(better, c[0] + i0, best_j))
            best_row.copy_(torch.where(better, chunk.index_select(0, c)[0], best_row))

        streamer.run(on_chunk)

    def gap_at(t: int) -> torch.Tensor:
        return 2.0 * (emax / max(t, 1) - rz) / M

    T = 0
    for t in range(k):
        scan(t, select=True)
        if t > 0:
            gaps[t - 1] = gap_at(t)
        picks[t] = best_j
        taken.index_fill_(0, best_j.view(1), True)
        S += best_row.double()
        z = S / (t + 1)
        r = y64 - z
        losses[t] = (r @ r) / M
        rz.copy_(r @ z)
        q.copy_(((t + 2) * y64 - S).to(acc))
        T = t + 1
        if stop_loss >= 0 and float(losses[t]) <= stop_loss:  # one small read per step
            break
    scan(T, select=False)
    gaps[max(T, 1) - 1] = gap_at(T)

    notes = {
        "host_stream": (
            f"U ({U.numel() * U.element_size() / 2**30:.2f} GiB) streamed from host memory [{mode}] in "
            f"{plan.n_chunks} chunks of {plan.rows} rows per pass"
            + (
                f" through {plan.buffers} device buffers, copies overlapped with compute"
                if device.type == "cuda"
                else ""
            )
        ),
        "host_stream_chunks": plan.n_chunks,
        "host_stream_rows": plan.rows,
        "host_stream_bytes": streamer.bytes_copied,
    }
    return LoopResult.uniform(picks[:T], losses[:T], gaps[: max(T, 1)], N, notes)

"""Triton kernels of the streaming greedy step, in the nearest-neighbour form (docs/design.md section 2).

With S_t the sum of the t rows picked so far and q_t = (t+1) y - S_t, the step-t loss of
candidate j is (||q_t||^2 + ||u_j||^2 - 2 <q_t, u_j>) / (t+1)^2, so the pick is

    argmin_j  norms_j - 2 d_j,   d = U q_t      (ties to the lowest index),

and <r_t, u_j> = (d_j - b_j) / t (b = U y) gives the Frank-Wolfe gap at z_t = S_t / t from the
same pass. For integer-valued data q_t is an integer vector, so exact ties stay exact.

One step is four launches, all reading the step number t and the pick j* from device memory
(nothing is read back by the host until the loop ends):

  dots_partial_kernel   grid (N tiles, M splits): float32 partial sums of U q, one per
                        (split, row); no atomics, so the result is deterministic.
  select_kernel         one program: sums the splits in a fixed order, scores, no-replacement
                        mask, argmin (lowest index on ties), max (d_j - b_j) for the gap;
                        writes picks[t], gaps[t-1], taken[j*], state[JSTAR].
  update_kernel         grid over M: S += u_{j*}, q <- (t+2) y - S, block partials of
                        ||r||^2 and <r, z> in float64.
  loss_kernel           one program: the exact float64 loss ||r_{t+1}||^2 / M, t += 1, and
                        the stop flag (loss <= stop_loss), after which every kernel of the
                        later steps returns at once.

Storage float32 / bfloat16 / float16 (float64 too) is upcast with `.to()` right after each
load; accumulation is float32 (float64 for float64 storage). The same kernels run on CPU
tensors under TRITON_INTERPRET=1 (set before triton is imported).

A plain PyTorch reference of the whole step lives beside the kernels (`reference_step`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# int64 state: [DONE, STEP (picks so far), JSTAR (last pick), spare]
DONE = tl.constexpr(0)
STEP = tl.constexpr(1)
JSTAR = tl.constexpr(2)
# float64 state: [STOP_LOSS, RZ = <r_t, z_t>, M as a float, spare]
STOP_LOSS = tl.constexpr(0)
RZ = tl.constexpr(1)
MF = tl.constexpr(2)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def dots_partial_kernel(
    U_ptr,
    v_ptr,
    part_ptr,
    part2_ptr,
    state_ptr,
    N,
    M,
    stride_u,
    part_stride,
    chunk,
    CHECK_DONE: tl.constexpr,
    WITH_NORMS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """part[s, i] = sum over split s of U[i, m] v[m] (and part2[s, i] = sum U[i, m]^2).

    Split s covers columns [s * chunk, min((s+1) * chunk, M)); chunk is a multiple of BLOCK_M,
    so only the last tile of the last split is ragged (masked against M).
    """
    if CHECK_DONE:
        if tl.load(state_ptr + DONE) != 0:
            return
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_ptr = U_ptr + rows.to(tl.int64)[:, None] * stride_u
    cols0 = tl.arange(0, BLOCK_M)
    acc_ty = v_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M], acc_ty)
    acc2 = tl.zeros([BLOCK_N, BLOCK_M], acc_ty)
    m_lo = pid_s * chunk
    m_hi = tl.minimum(m_lo + chunk, M)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        cols = m0 + cols0
        col_ok = cols < M
        u = tl.load(row_ptr + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(acc_ty)
        v = tl.load(v_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
        acc += u * v[None, :]
        if WITH_NORMS:
            acc2 += u * u
    out = part_ptr + pid_s * part_stride + rows
    tl.store(out, tl.sum(acc, axis=1), mask=row_ok)
    if WITH_NORMS:
        tl.store(part2_ptr + pid_s * part_stride + rows, tl.sum(acc2, axis=1), mask=row_ok)


@triton.jit
def reduce_splits_kernel(part_ptr, out_ptr, n_splits, part_stride, N, BLOCK: tl.constexpr):
    """out[i] = sum_s part[s, i], the splits added in increasing s (deterministic)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
    for s in range(1, n_splits):
        acc += tl.load(part_ptr + s * part_stride + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc, mask=ok)


@triton.jit
def select_kernel(
    part_ptr,
    norms_ptr,
    b_ptr,
    taken_ptr,
    state_ptr,
    fstate_ptr,
    picks_ptr,
    gaps_ptr,
    n_splits,
    part_stride,
    N,
    REPLACEMENT: tl.constexpr,
    FINAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program. d = sum of the splits; pick argmin norms - 2 d (lowest index on ties,
    taken rows masked without replacement); gap at z_t from max_j (d_j - b_j) / t.

    FINAL: the gap-only pass after the loop (runs even when the stop flag is set).
    """
    if not FINAL:
        if tl.load(state_ptr + DONE) != 0:
            return
    t = tl.load(state_ptr + STEP)
    inf = float("inf")
    best = tl.full([], inf, tl.float64)
    best_j = tl.full([], 0, tl.int64)
    emax = tl.full([], -inf, tl.float64)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        ok = offs < N
        d = tl.load(part_ptr + offs, mask=ok, other=0.0)
        for s in range(1, n_splits):
            d += tl.load(part_ptr + s * part_stride + offs, mask=ok, other=0.0)
        d = d.to(tl.float64)
        bj = tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float64)
        # t * e_j = d_j - b_j for t >= 1; at t = 0, q = y and e_j = d_j.
        te = tl.where(t > 0, d - bj, d)
        emax = tl.maximum(emax, tl.max(tl.where(ok, te, -inf), axis=0))
        if not FINAL:
            nrm = tl.load(norms_ptr + offs, mask=ok, other=0.0).to(tl.float64)
            score = nrm - 2.0 * d
            keep = ok
            if not REPLACEMENT:
                keep = keep & (tl.load(taken_ptr + offs, mask=ok, other=1) == 0)
            score = tl.where(keep, score, inf)
            cmin = tl.min(score, axis=0)
            cidx = tl.min(tl.where(score == cmin, offs, N), axis=0)
            if cmin < best:  # strict: an earlier chunk keeps its lower index on a tie
                best = cmin
                best_j = cidx.to(tl.int64)
    den = tl.maximum(t, 1).to(tl.float64)
    gap = 2.0 * (emax / den - tl.load(fstate_ptr + RZ)) / tl.load(fstate_ptr + MF)
    if FINAL:
        tl.store(gaps_ptr + tl.maximum(t - 1, 0), gap)
    else:
        if t > 0:
            tl.store(gaps_ptr + (t - 1), gap)
        tl.store(picks_ptr + t, best_j)
        tl.store(taken_ptr + best_j, tl.full([], 1, tl.int8))
        tl.store(state_ptr + JSTAR, best_j)


@triton.jit
def update_kernel(U_ptr, y_ptr, S_ptr, q_ptr, lpart_ptr, state_ptr, stride_u, M, BLOCK: tl.constexpr):
    """S += u_{j*}; z = S/(t+1); r = y - z; q = (t+2) y - S; per-program float64 partials of
    ||r||^2 (lpart[pid]) and <r, z> (lpart[P + pid])."""
    if tl.load(state_ptr + DONE) != 0:
        return
    t = tl.load(state_ptr + STEP)
    j = tl.load(state_ptr + JSTAR)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    u = tl.load(U_ptr + j * stride_u + offs, mask=ok, other=0.0).to(tl.float64)
    S = tl.load(S_ptr + offs, mask=ok, other=0.0) + u
    tl.store(S_ptr + offs, S, mask=ok)
    tp1 = (t + 1).to(tl.float64)
    yv = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float64)
    z = S / tp1
    r = yv - z
    q = (tp1 + 1.0) * yv - S
    tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(lpart_ptr + pid, tl.sum(tl.where(ok, r * r, 0.0), axis=0))
    tl.store(lpart_ptr + nprog + pid, tl.sum(tl.where(ok, r * z, 0.0), axis=0))


@triton.jit
def loss_kernel(lpart_ptr, state_ptr, fstate_ptr, losses_ptr, n_parts, BLOCK: tl.constexpr):
    """One program: loss_t = sum(lpart[:P]) / M (fixed order), RZ = sum(lpart[P:]), t += 1,
    and the stop flag."""
    if tl.load(state_ptr + DONE) != 0:
        return
    t = tl.load(state_ptr + STEP)
    rr = tl.zeros([BLOCK], tl.float64)
    rz = tl.zeros([BLOCK], tl.float64)
    for p0 in range(0, n_parts, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        ok = offs < n_parts
        rr += tl.load(lpart_ptr + offs, mask=ok, other=0.0)
        rz += tl.load(lpart_ptr + n_parts + offs, mask=ok, other=0.0)
    loss = tl.sum(rr, axis=0) / tl.load(fstate_ptr + MF)
    tl.store(losses_ptr + t, loss)
    tl.store(fstate_ptr + RZ, tl.sum(rz, axis=0))
    tl.store(state_ptr + STEP, t + 1)
    if loss <= tl.load(fstate_ptr + STOP_LOSS):
        tl.store(state_ptr + DONE, tl.full([], 1, tl.int64))


# ---------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DotsConfig:
    block_n: int
    block_m: int
    num_warps: int
    num_stages: int

    def triton_config(self) -> triton.Config:
        return triton.Config(
            {"BLOCK_N": self.block_n, "BLOCK_M": self.block_m}, num_warps=self.num_warps, num_stages=self.num_stages
        )


# A small set for Hopper. A memory-bound matrix-vector product: 16-byte loads along M, 32
# elements of U per thread per iteration (about 80-110 registers, no spills; sm_90 ptxas
# report in tests/test_gpu_kernels.py), one config with 64 per thread (more bytes in flight,
# fewer resident warps), and enough rows per program to amortise the reads of v.
HOPPER_DOTS_CONFIGS = (
    DotsConfig(32, 128, 4, 2),
    DotsConfig(64, 128, 8, 2),
    DotsConfig(16, 256, 4, 2),
    DotsConfig(128, 64, 8, 2),
    DotsConfig(64, 128, 4, 2),
)
# float64 storage doubles the registers per element: 16 elements per thread.
HOPPER_DOTS_CONFIGS_F64 = (
    DotsConfig(16, 128, 4, 2),
    DotsConfig(32, 64, 4, 2),
    DotsConfig(32, 128, 8, 2),
    DotsConfig(64, 64, 8, 2),
)
# prepare (once per call) runs one fixed configuration, with the norms accumulator too.
PREPARE_CONFIG = DotsConfig(32, 256, 8, 2)
PREPARE_CONFIG_F64 = DotsConfig(16, 128, 4, 2)
# Small tiles under the interpreter, so that small test problems still span several tiles
# and splits (ragged last tile and last split included).
INTERPRET_DOTS_CONFIG = DotsConfig(16, 32, 4, 1)

SPLIT_GRANULE = 512  # every split starts at a multiple of this (a multiple of every BLOCK_M)
SELECT_BLOCK = 1024
SELECT_WARPS = 8
UPDATE_BLOCK = 1024
UPDATE_WARPS = 8  # 4 warps x 8 elements: triton 3.6 (ptxas 12.8) spills 8 bytes
LOSS_BLOCK = 512
LOSS_WARPS = 4
REDUCE_BLOCK = 1024
REDUCE_WARPS = 8  # 4 warps x 8 float64 per thread: ptxas 12.9 caps at 32 registers and spills

if INTERPRET:  # keep the interpreted programs small
    SPLIT_GRANULE = INTERPRET_DOTS_CONFIG.block_m
    SELECT_BLOCK = 32
    UPDATE_BLOCK = 64
    LOSS_BLOCK = 4
    REDUCE_BLOCK = 32


def _tuned(configs):
    return triton.autotune(
        configs=[c.triton_config() for c in configs], key=["N", "M", "stride_u", "CHECK_DONE", "WITH_NORMS"]
    )(dots_partial_kernel)


# The autotuned wrappers of the step's dots kernel (GPU only; the interpreter runs one config).
dots_partial_tuned = _tuned(HOPPER_DOTS_CONFIGS)
dots_partial_tuned_f64 = _tuned(HOPPER_DOTS_CONFIGS_F64)


def configs_for(dtype: torch.dtype) -> tuple[DotsConfig, ...]:
    return HOPPER_DOTS_CONFIGS_F64 if dtype == torch.float64 else HOPPER_DOTS_CONFIGS


def prepare_config_for(dtype: torch.dtype) -> DotsConfig:
    if INTERPRET:
        return INTERPRET_DOTS_CONFIG
    return PREPARE_CONFIG_F64 if dtype == torch.float64 else PREPARE_CONFIG


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a nominal small "device"


def split_plan(N: int, M: int, device: torch.device, granule: int | None = None) -> tuple[int, int]:
    """(splits, chunk): split M so that tiles x splits fill the device about four times over
    (nominal 64-row tiles; 16 under the interpreter). chunk is a multiple of the granule."""
    granule = granule or SPLIT_GRANULE
    nominal_rows = INTERPRET_DOTS_CONFIG.block_n if INTERPRET else 64
    tiles = triton.cdiv(N, nominal_rows)
    want = triton.cdiv(4 * num_sms(device), tiles)
    splits = max(1, min(want, triton.cdiv(M, granule)))
    chunk = triton.cdiv(triton.cdiv(M, splits), granule) * granule
    return triton.cdiv(M, chunk), chunk


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def launch_dots_partial(U, v, part, part2, state, splits, chunk, *, check_done, with_norms, config=None):
    """part (and part2) are (splits, N) buffers; fills part[s, :] for every split s."""
    N, M = U.shape
    common = (U, v, part, part2, state, N, M, U.stride(0), part.stride(0), chunk)
    if config is None and not INTERPRET and U.is_cuda:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
        tuned = dots_partial_tuned_f64 if v.dtype == torch.float64 else dots_partial_tuned
        tuned[grid](*common, CHECK_DONE=check_done, WITH_NORMS=with_norms)
        return
    cfg = config or prepare_config_for(v.dtype)
    grid = (triton.cdiv(N, cfg.block_n), splits)
    dots_partial_kernel[grid](
        *common,
        CHECK_DONE=check_done,
        WITH_NORMS=with_norms,
        BLOCK_N=cfg.block_n,
        BLOCK_M=cfg.block_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _reduce_splits(part, out, splits):
    N = out.shape[0]
    reduce_splits_kernel[(triton.cdiv(N, REDUCE_BLOCK),)](
        part, out, splits, part.stride(0), N, BLOCK=REDUCE_BLOCK, num_warps=REDUCE_WARPS
    )


def prepare(U: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||u_j||^2, <y, u_j>) in y's dtype: one pass over U."""
    N, M = U.shape
    splits, chunk = split_plan(N, M, U.device)
    part = torch.empty(2, splits, N, dtype=y.dtype, device=U.device)
    state = torch.zeros(4, dtype=torch.int64, device=U.device)
    launch_dots_partial(
        U,
        y,
        part[0],
        part[1],
        state,
        splits,
        chunk,
        check_done=False,
        with_norms=True,
        config=prepare_config_for(y.dtype),
    )
    norms = torch.empty(N, dtype=y.dtype, device=U.device)
    b = torch.empty_like(norms)
    _reduce_splits(part[1], norms, splits)
    _reduce_splits(part[0], b, splits)
    return norms, b


def dots(U: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """U v in v's dtype: one pass over U."""
    N, M = U.shape
    splits, chunk = split_plan(N, M, U.device)
    part = torch.empty(splits, N, dtype=v.dtype, device=U.device)
    state = torch.zeros(4, dtype=torch.int64, device=U.device)
    launch_dots_partial(U, v, part, part, state, splits, chunk, check_done=False, with_norms=False)
    out = torch.empty(N, dtype=v.dtype, device=U.device)
    _reduce_splits(part, out, splits)
    return out


class GreedyLoop:
    """Device buffers of one greedy call and the launches of one step.

    Every launch reads t and j* from `state` on the device, so `step()` is the same sequence of
    launches with the same arguments at every step (it can be captured once in a CUDA graph).
    """

    def __init__(self, U, y, k, replacement, stop_loss, norms=None, b=None):
        N, M = U.shape
        dev = U.device
        self.U, self.y, self.k, self.replacement = U, y, k, bool(replacement)
        self.N, self.M = N, M
        if norms is None or b is None:
            norms, b = prepare(U, y)
        self.norms, self.b = norms, b
        self.splits, self.chunk = split_plan(N, M, dev)
        self.part = torch.empty(self.splits, N, dtype=y.dtype, device=dev)
        self.state = torch.zeros(4, dtype=torch.int64, device=dev)
        # filled on the device: torch.tensor(..., device="cuda") would copy from pageable memory
        # and synchronise
        self.fstate = torch.zeros(4, dtype=torch.float64, device=dev)
        self.fstate.narrow(0, STOP_LOSS.value, 1).fill_(float(stop_loss))
        self.fstate.narrow(0, MF.value, 1).fill_(float(M))
        self.fstate_host_stop = float(stop_loss)
        self.taken = torch.zeros(N, dtype=torch.int8, device=dev)
        self.picks = torch.full((max(k, 1),), -1, dtype=torch.int64, device=dev)
        self.losses = torch.full((max(k, 1),), float("nan"), dtype=torch.float64, device=dev)
        self.gaps = torch.full((max(k, 1),), float("nan"), dtype=torch.float64, device=dev)
        self.S = torch.zeros(M, dtype=torch.float64, device=dev)
        self.q = y.clone()  # q_0 = y
        self.n_update = triton.cdiv(M, UPDATE_BLOCK)
        self.lpart = torch.empty(2 * self.n_update, dtype=torch.float64, device=dev)

    def _select(self, final: bool):
        select_kernel[(1,)](
            self.part,
            self.norms,
            self.b,
            self.taken,
            self.state,
            self.fstate,
            self.picks,
            self.gaps,
            self.splits,
            self.part.stride(0),
            self.N,
            REPLACEMENT=self.replacement,
            FINAL=final,
            BLOCK=SELECT_BLOCK,
            num_warps=SELECT_WARPS,
        )

    def step(self):
        launch_dots_partial(
            self.U, self.q, self.part, self.part, self.state, self.splits, self.chunk, check_done=True, with_norms=False
        )
        self._select(final=False)
        update_kernel[(self.n_update,)](
            self.U,
            self.y,
            self.S,
            self.q,
            self.lpart,
            self.state,
            self.U.stride(0),
            self.M,
            BLOCK=UPDATE_BLOCK,
            num_warps=UPDATE_WARPS,
        )
        loss_kernel[(1,)](
            self.lpart, self.state, self.fstate, self.losses, self.n_update, BLOCK=LOSS_BLOCK, num_warps=LOSS_WARPS
        )

    def finish(self):
        """The gap at the last z (one more pass over U, run whatever the stop flag says)."""
        launch_dots_partial(
            self.U,
            self.q,
            self.part,
            self.part,
            self.state,
            self.splits,
            self.chunk,
            check_done=False,
            with_norms=False,
        )
        self._select(final=True)

    def run(self, use_graph: bool = False):
        """All k steps and the final pass, then one read of the step count (the only sync)."""
        step = self.step
        first = 0
        if use_graph and self.U.is_cuda and self.k > 1:
            self.step()  # compiles and autotunes outside the capture
            first = 1
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step()
            step = graph.replay
        # With a stop loss, peek at the device's stop flag every 16 steps without waiting (an
        # async copy to pinned memory and an event that is only queried), so that the host stops
        # launching no-op steps soon after the device has stopped.
        peek = self.U.is_cuda and float(self.fstate_host_stop) >= 0.0
        if peek:
            flag = torch.zeros(1, dtype=torch.int64, pin_memory=True)
            event = torch.cuda.Event()
            pending = False
        for s in range(first, self.k):
            if peek and s % 16 == 0:
                if pending and event.query():
                    pending = False
                    if int(flag[0]) != 0:
                        break
                if not pending:
                    flag.copy_(self.state[DONE.value : DONE.value + 1], non_blocking=True)
                    event.record()
                    pending = True
            step()
        self.finish()
        T = int(self.state[STEP.value])
        return self.picks[:T], self.losses[:T], self.gaps[: max(T, 1)]


# ---------------------------------------------------------------------------------------------
# plain PyTorch reference of one step (float64), beside the kernels
# ---------------------------------------------------------------------------------------------
def reference_step(U, y, S, t, taken, replacement):
    """(j*, gap at z_t or None) of step t from S = sum of the t rows picked so far."""
    U64, y64 = U.double(), y.double()
    q = (t + 1) * y64 - S
    d = U64 @ q
    score = (U64 * U64).sum(1) - 2 * d
    if not replacement:
        score = score.masked_fill(taken, float("inf"))
    gap = None
    if t > 0:
        z = S / t
        r = y64 - z
        gap = float(2 * ((U64 @ r).max() - r @ z) / U.shape[1])
    return int(torch.argmin(score)), gap


# ---------------------------------------------------------------------------------------------
# ahead-of-time compilation for sm_90 (CI without a GPU)
# ---------------------------------------------------------------------------------------------
_TT = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}


def sm90_compile_specs(dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64)):
    """Every (kernel, signature, constexprs, options) the GPU path launches, for `triton.compile`
    with GPUTarget("cuda", 90, 32). Pointers and the row stride / M carry the divisibility-16
    hint the JIT gives them at run time when they are aligned (the fast path)."""
    specs = []

    def add(name, fn, sig, consts, warps, stages, aligned=()):
        full = dict(sig)
        for c in consts:
            full[c] = "constexpr"
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        specs.append(
            dict(
                name=name,
                fn=fn,
                signature=full,
                constexprs=dict(consts),
                attrs=attrs,
                options=dict(num_warps=warps, num_stages=stages),
            )
        )

    for dt in dtypes:
        acc = "fp64" if dt == torch.float64 else "fp32"
        st = _TT[dt]
        dsig = {
            "U_ptr": f"*{st}",
            "v_ptr": f"*{acc}",
            "part_ptr": f"*{acc}",
            "part2_ptr": f"*{acc}",
            "state_ptr": "*i64",
            "N": "i32",
            "M": "i32",
            "stride_u": "i32",
            "part_stride": "i32",
            "chunk": "i32",
        }
        aligned = ("U_ptr", "v_ptr", "part_ptr", "part2_ptr", "state_ptr", "M", "stride_u", "chunk")
        for cfg in configs_for(dt):
            for check_done in (True, False):
                add(
                    f"dots_partial[{st},{cfg.block_n}x{cfg.block_m},w{cfg.num_warps}s{cfg.num_stages},"
                    f"{'step' if check_done else 'dots'}]",
                    dots_partial_kernel,
                    dsig,
                    {"CHECK_DONE": check_done, "WITH_NORMS": False, "BLOCK_N": cfg.block_n, "BLOCK_M": cfg.block_m},
                    cfg.num_warps,
                    cfg.num_stages,
                    aligned,
                )
        cfg = PREPARE_CONFIG_F64 if dt == torch.float64 else PREPARE_CONFIG
        add(
            f"dots_partial[{st},{cfg.block_n}x{cfg.block_m},prepare]",
            dots_partial_kernel,
            dsig,
            {"CHECK_DONE": False, "WITH_NORMS": True, "BLOCK_N": cfg.block_n, "BLOCK_M": cfg.block_m},
            cfg.num_warps,
            cfg.num_stages,
            aligned,
        )
        cfg = configs_for(dt)[0]  # the unaligned path (M not a multiple of 16 bytes)
        add(
            f"dots_partial[{st},{cfg.block_n}x{cfg.block_m},unaligned]",
            dots_partial_kernel,
            dsig,
            {"CHECK_DONE": True, "WITH_NORMS": False, "BLOCK_N": cfg.block_n, "BLOCK_M": cfg.block_m},
            cfg.num_warps,
            cfg.num_stages,
            ("v_ptr", "part_ptr", "state_ptr"),
        )
        add(
            f"update[{st}]",
            update_kernel,
            {
                "U_ptr": f"*{st}",
                "y_ptr": f"*{acc}",
                "S_ptr": "*fp64",
                "q_ptr": f"*{acc}",
                "lpart_ptr": "*fp64",
                "state_ptr": "*i64",
                "stride_u": "i32",
                "M": "i32",
            },
            {"BLOCK": UPDATE_BLOCK},
            UPDATE_WARPS,
            1,
            ("U_ptr", "y_ptr", "S_ptr", "q_ptr", "lpart_ptr", "state_ptr"),
        )
    for acc in sorted({"fp64" if dt == torch.float64 else "fp32" for dt in dtypes}):
        for repl in (True, False):
            for final in (False, True) if repl else (False,):
                add(
                    f"select[{acc},{'repl' if repl else 'norepl'}{',final' if final else ''}]",
                    select_kernel,
                    {
                        "part_ptr": f"*{acc}",
                        "norms_ptr": f"*{acc}",
                        "b_ptr": f"*{acc}",
                        "taken_ptr": "*i8",
                        "state_ptr": "*i64",
                        "fstate_ptr": "*fp64",
                        "picks_ptr": "*i64",
                        "gaps_ptr": "*fp64",
                        "n_splits": "i32",
                        "part_stride": "i32",
                        "N": "i32",
                    },
                    {"REPLACEMENT": repl, "FINAL": final, "BLOCK": SELECT_BLOCK},
                    SELECT_WARPS,
                    1,
                    ("part_ptr", "norms_ptr", "b_ptr", "taken_ptr", "state_ptr", "fstate_ptr", "picks_ptr", "gaps_ptr"),
                )
        add(
            f"reduce_splits[{acc}]",
            reduce_splits_kernel,
            {"part_ptr": f"*{acc}", "out_ptr": f"*{acc}", "n_splits": "i32", "part_stride": "i32", "N": "i32"},
            {"BLOCK": REDUCE_BLOCK},
            REDUCE_WARPS,
            1,
            ("part_ptr", "out_ptr"),
        )
    add(
        "loss",
        loss_kernel,
        {"lpart_ptr": "*fp64", "state_ptr": "*i64", "fstate_ptr": "*fp64", "losses_ptr": "*fp64", "n_parts": "i32"},
        {"BLOCK": LOSS_BLOCK},
        LOSS_WARPS,
        1,
        ("lpart_ptr", "state_ptr", "fstate_ptr", "losses_ptr"),
    )
    return specs

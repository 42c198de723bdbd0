"""The Gram engine's uniform loop on a GPU: one persistent Triton program for all k steps.

A single program (one CTA) loops over the k steps. Each step reads one row of G, adds it into
ct = G counts (kept in a float64 scratch vector), and in the same sweep over the N candidates
computes the Frank-Wolfe gap of the new point and the next step's scores
G_jj - 2 (t+1) b_j + 2 ct_j and their argmin (ties to the lowest index): O(N) per step and a
single launch for the whole selection, with no host round trip between steps. Semantics are
those of the C++ loop (csrc/cpu/gram_cpu.cpp, "uniform") and of gfs.engines.uniform.gram_loop,
the plain PyTorch reference beside which this kernel is tested (TRITON_INTERPRET=1 on a CPU).

Uses Triton 3.6 language features only (tl.load/store/where/min/max, scf.if on scalars,
tl.debug_barrier).
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - triton missing
    triton = tl = None
    _IMPORT_ERROR = f"triton does not import ({exc})"

BLOCK = 1024
NUM_WARPS = 8


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason() -> str | None:
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if not interpreting() and not torch.cuda.is_available():
        return "no CUDA device"
    return None


if triton is not None:

    @triton.jit
    def gram_uniform_kernel(
        G,
        diag,
        b,
        ct,
        taken,  # (N, N) row stride stride_g; (N,); (N,); (N,) float64 scratch = 0; (N,) int8 = 0
        out_idx,
        out_loss,
        out_gap,
        n_done,  # (k,) int64, (k,) float64, (k,) float64, (1,) int64
        N,
        k,
        stride_g,
        yy,
        count,
        stop_loss,  # float64 scalars
        REPLACEMENT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs0 = tl.arange(0, BLOCK)
        inf = float("inf")
        # step-0 scores: G_jj - 2 b_j
        best_val = tl.full([], inf, tl.float64)
        best_idx = tl.full([], 0, tl.int32) + N
        for start in range(0, N, BLOCK):
            offs = start + offs0
            m = offs < N
            d = tl.load(diag + offs, mask=m, other=0.0)
            bb = tl.load(b + offs, mask=m, other=0.0)
            s = tl.where(m, d - 2.0 * bb, inf)
            tmin = tl.min(s, 0)
            tidx = tl.min(tl.where(s == tmin, offs, N), 0)
            better = tmin < best_val  # strict: an earlier tile keeps a tie
            best_idx = tl.where(better, tidx, best_idx)
            best_val = tl.where(better, tmin, best_val)
        Q = tl.full([], 0.0, tl.float64)  # counts^T G counts
        B = tl.full([], 0.0, tl.float64)  # sum of b over the picks
        done = tl.full([], 0, tl.int32)
        for t in range(0, k):
            if done == 0:
                tl.debug_barrier()  # the previous sweep's ct / taken stores are visible to every thread
                j = best_idx
                t1 = tl.zeros([], tl.int64) + t + 1  # steps so far, as a tensor in both modes
                n = t1.to(tl.float64)
                cj = tl.load(ct + j)
                Q += 2.0 * cj + tl.load(diag + j)
                B += tl.load(b + j)
                tl.store(taken + j, 1)
                tl.debug_barrier()
                row = G + j.to(tl.int64) * stride_g
                nxt = 2.0 * (n + 1.0)
                best_val = tl.full([], inf, tl.float64)
                best_idx = tl.full([], 0, tl.int32) + N
                gmax = tl.full([], -inf, tl.float64)
                for start in range(0, N, BLOCK):
                    offs = start + offs0
                    m = offs < N
                    c = tl.load(ct + offs, mask=m, other=0.0) + tl.load(row + offs, mask=m, other=0.0)
                    tl.store(ct + offs, c, mask=m)
                    bb = tl.load(b + offs, mask=m, other=0.0)
                    d = tl.load(diag + offs, mask=m, other=0.0)
                    e = tl.where(m, bb - c / n, -inf)
                    gmax = tl.maximum(gmax, tl.max(e, 0))
                    s = d - nxt * bb + 2.0 * c
                    if not REPLACEMENT:
                        tk = tl.load(taken + offs, mask=m, other=1)
                        s = tl.where(tk != 0, inf, s)
                    s = tl.where(m, s, inf)
                    tmin = tl.min(s, 0)
                    tidx = tl.min(tl.where(s == tmin, offs, N), 0)
                    better = tmin < best_val
                    best_idx = tl.where(better, tidx, best_idx)
                    best_val = tl.where(better, tmin, best_val)
                zb = B / n
                zz = Q / (n * n)
                loss = (yy - 2.0 * zb + zz) / count
                gap = 2.0 * (gmax - (zb - zz)) / count
                tl.store(out_idx + t, j.to(tl.int64))
                tl.store(out_loss + t, loss)
                tl.store(out_gap + t, gap)
                tl.store(n_done, t1)
                if loss <= stop_loss:
                    done = 1


def gram_uniform(
    G: torch.Tensor,
    b: torch.Tensor,
    yy: float,
    count: int,
    k: int,
    replacement: bool,
    stop_loss: float,
    *,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The uniform loop from (G, b, yy, count) in one launch: (indices, losses, gaps), s <= k steps.
    `block` (a power of two) overrides the tile width (tests use small tiles to sweep many)."""
    why = unavailable_reason()
    if why:
        raise RuntimeError(f"the Triton Gram loop cannot run here: {why}")
    N = G.shape[0]
    G = G.contiguous() if G.stride(1) != 1 else G
    dev = G.device
    f64 = dict(dtype=torch.float64, device=dev)
    diag = torch.diagonal(G).contiguous().double()
    ct = torch.zeros(N, **f64)
    taken = torch.zeros(N, dtype=torch.int8, device=dev)
    idx = torch.empty(k, dtype=torch.int64, device=dev)
    losses = torch.empty(k, **f64)
    gaps = torch.empty(k, **f64)
    n_done = torch.zeros(1, dtype=torch.int64, device=dev)
    gram_uniform_kernel[(1,)](
        G,
        diag,
        b.double().contiguous(),
        ct,
        taken,
        idx,
        losses,
        gaps,
        n_done,
        N,
        k,
        G.stride(0),
        float(yy),
        float(count),
        float(stop_loss),
        REPLACEMENT=bool(replacement),
        BLOCK=block or BLOCK,
        num_warps=NUM_WARPS,
    )
    s = int(n_done.item())
    return idx[:s], losses[:s], gaps[:s]


def compile_for(arch: int = 90, replacement: bool = True):
    """Compile the kernel ahead of time for a CUDA architecture (no GPU needed), returning
    triton's compiled kernel (asm["ptx"], asm["cubin"], metadata)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {
        "G": "*fp64",
        "diag": "*fp64",
        "b": "*fp64",
        "ct": "*fp64",
        "taken": "*i8",
        "out_idx": "*i64",
        "out_loss": "*fp64",
        "out_gap": "*fp64",
        "n_done": "*i64",
        "N": "i32",
        "k": "i32",
        "stride_g": "i64",
        "yy": "fp64",
        "count": "fp64",
        "stop_loss": "fp64",
        "REPLACEMENT": "constexpr",
        "BLOCK": "constexpr",
    }
    src = ASTSource(
        fn=gram_uniform_kernel, signature=signature, constexprs={"REPLACEMENT": replacement, "BLOCK": BLOCK}
    )
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": NUM_WARPS})


def ptxas_report(compiled, arch: int = 90) -> dict:
    """Registers and spills of the compiled kernel, from `ptxas -v` on its PTX."""
    import re
    import subprocess
    import tempfile

    import triton.backends.nvidia as nv

    ptxas = os.environ.get("TRITON_PTXAS_PATH") or os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        out = subprocess.run(
            [
                ptxas,
                "-v",
                f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                f.name,
                "-o",
                os.devnull,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        os.unlink(f.name)
    text = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(stores.group(1)) if stores else None,
        "spill_loads": int(loads.group(1)) if loads else None,
        "text": text,
    }


__all__ = ["gram_uniform", "unavailable_reason", "compile_for", "ptxas_report", "interpreting", "math"]

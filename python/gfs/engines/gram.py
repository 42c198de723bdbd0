"""The Gram engine: greedy forward selection from sufficient statistics.

The data enter only through G = U U^T, b = U y, ||y||^2 and the count M (gfs.GramStats); a step
reads at most one row of G and does O(N) work (refit: O(N |set|) for its projections). `run`
calls the backend's whole native loop where it has one for the rule (the C++ loop of
csrc/cpu/gram_cpu.cpp on CPU, every rule; one persistent Triton program on a GPU, uniform),
else the rule's Python loop over rows of G (gfs.engines.uniform / line_search / refit, any
device). Every loop works in float64 and ties go to the lowest index.

Building G is here too: the block-triangle product (`Accumulator`) that gfs.GramStats and the
layer statistics use, and whose rate the cost model measures.
"""

from __future__ import annotations

import torch

from gfs_kernels.base import Backend, LoopResult

from .. import _scale
from . import line_search, refit, uniform

LOOPS = {"uniform": uniform.gram_loop, "line_search": line_search.gram_loop, "refit": refit.gram_loop}


def tolerance(precision: torch.dtype) -> float:
    """Relative pivot tolerance for degenerate directions, from the rounding level of the data."""
    return 1e-9 if precision == torch.float64 else 1e-4


def run(
    backend: Backend,
    G: torch.Tensor,
    b: torch.Tensor,
    yy: float,
    count: int,
    k: int,
    *,
    step: str,
    replacement: bool,
    stop_loss: float,
    tol: float,
) -> LoopResult:
    """Run `step` for at most k steps from (G, b, yy, count) on `backend` (planned by gfs.engines.plan)."""
    if step in backend.native_gram:
        return backend.gram_loop(G, b, yy, count, k, step, replacement, stop_loss, tol)
    res = LOOPS[step](
        lambda j: G[j],
        torch.diagonal(G).contiguous(),
        b,
        yy,
        count,
        k,
        replacement=replacement,
        stop_loss=stop_loss,
        tol=tol,
    )
    res.notes["gram_loop"] = "Python loop over torch operations"
    return res


# -- building G --------------------------------------------------------------------------------
DEFAULT_CHUNK = 8192  # entries per float32 product: bounds the float32 summation length


def build_flops(n: int, m: int) -> float:
    """Flops of adding the product of an (n, m) batch (the cost model's unit of Gram-building
    work): the GEMMs of the lower block triangle."""
    bs = Accumulator.BLOCK if n > Accumulator.BLOCK else n
    return float(sum(2 * (min(n, i + bs) - i) * min(n, i + bs) * m for i in range(0, n, bs)))


class Accumulator:
    """Products A A^T in the product dtype, added into the float64 G by `flush` (every `chunk`
    entries at most, and before G is read).

    The product is a symmetric rank-m update done as GEMMs on the lower block triangle only
    (row block i times columns 0..i: about half the flops of A A^T), accumulated in place
    (addmm_, beta = 1) in a buffer of the product dtype. The flush adds the lower triangle and its
    mirror into G (on CPU in cache-sized blocks with numpy, single-threaded), so G is exactly
    symmetric. (BLAS syrk would do the same; its thread pool fights torch's for the cores.)"""

    BLOCK = 512  # rows per GEMM of the block triangle
    _FLUSH_BLOCK = 512

    def __init__(self, n: int, device: torch.device):
        self.n, self.device = n, device
        self.buf: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None
        self.cols = 0

    def add(self, A: torch.Tensor) -> None:
        """buf[lower block triangle] += A A^T for A (n, m) in the product dtype."""
        if self.buf is None or self.buf.dtype != A.dtype:
            self.buf = torch.zeros(self.n, self.n, dtype=A.dtype, device=self.device)
        self.dtype = A.dtype
        self.cols += A.shape[1]
        n, bs = self.n, (self.BLOCK if self.n > self.BLOCK else self.n)
        for i in range(0, n, bs):
            i1 = min(n, i + bs)
            self.buf[i:i1, :i1].addmm_(A[i:i1], A[:i1].T)

    def flush(self, G: torch.Tensor, scale_exponent: int = 0) -> None:
        """G += the pending products times 2^scale_exponent (exact: products of a batch that was
        multiplied by a power of two are scaled back)."""
        if self.cols == 0 or self.buf is None:
            return
        if self.device.type == "cpu" and not scale_exponent:
            self._flush_numpy(self.buf, G)
        else:
            self._flush_torch(self.buf, G, scale_exponent)
        self.cols = 0

    def _blocks(self):
        bs = self.BLOCK if self.n > self.BLOCK else self.n
        return [(i, min(self.n, i + bs)) for i in range(0, self.n, bs)]

    def _flush_numpy(self, buf: torch.Tensor, G: torch.Tensor) -> None:
        L, Gn = buf.numpy(), G.numpy()
        for i, i1 in self._blocks():  # the row blocks of the GEMMs: columns 0..i1 are valid
            D = L[i:i1, i:i1]
            Gn[i:i1, i:i1] += (D + D.T) * 0.5
            for j in range(0, i, self._FLUSH_BLOCK):
                j1 = min(i, j + self._FLUSH_BLOCK)
                blk = L[i:i1, j:j1]
                Gn[i:i1, j:j1] += blk
                Gn[j:j1, i:i1] += blk.T
        L[...] = 0

    def _flush_torch(self, buf: torch.Tensor, G: torch.Tensor, scale_exponent: int = 0) -> None:
        low = torch.zeros_like(buf)
        for i, i1 in self._blocks():
            low[i:i1, :i1] = buf[i:i1, :i1]
        diag = _scale.ldexp(torch.diagonal(low).to(G.dtype), scale_exponent)
        strict = _scale.ldexp(low.tril(-1).to(G.dtype), scale_exponent)
        G += strict + strict.T
        G.diagonal().add_(diag)
        buf.zero_()


def gram_add(G: torch.Tensor, A: torch.Tensor) -> None:
    """G += A A^T (float64 G, A in the product dtype), exactly symmetric."""
    acc = Accumulator(A.shape[0], A.device)
    acc.add(A)
    acc.flush(G)

"""Sufficient statistics of greedy forward selection: GramStats, and layer helpers.

Every step rule needs only inner products among the candidates and with the target
(DESIGN.md section 2), so a selection can run from

    G = U U^T (N x N),  b = U y (N),  ||y||^2,  count = M (the number of entries summed),

plus, for centring, the sums of each u_j and of y. These are sums over data batches: they are
built streaming from a DataLoader (`update`), combined across workers (`merge`, `all_reduce`),
and stored (`save` / `load`). `gfs.select(stats, k=...)` runs the Gram engine on them.

Precision. G is accumulated in float64. Float64 batches are multiplied in float64; every other
dtype (float32, float16, bfloat16) is multiplied in float32, at most `chunk` entries (columns) at
a time, and each chunk's product is added into the float64 accumulators, so rounding does not
grow with the number of batches (per entry, about 1e-6 of sqrt(G_ii G_jj) for float32).
`compute_dtype=torch.float64` forces float64 products. b and the sums of u_j are computed the
same way (chunk products in the product dtype, summed in float64); ||y||^2 and the sum of y in
float64. G is kept exactly symmetric.

The dense network (the uniform average of the u_j) needs no data either: its loss is
(||y||^2 - 2 mean(b) + mean(G)) / count.
"""
from __future__ import annotations

import math
import os
import pickle
import zipfile

import torch

from . import _validation as check

FORMAT = "gfs.GramStats"
VERSION = 1
DEFAULT_CHUNK = 8192  # entries per float32 product: bounds the float32 summation length
_BLOCK = 512  # rows per block of the lower-triangular product (symmetry halves the work)


class GramStats:
    """Sufficient statistics (G, b, ||y||^2, count) of a selection problem with N candidates.

    Parameters
    ----------
    n : int
        Number of candidates N (rows of every features batch).
    device : torch.device or str
        Where the accumulators live (batches must be on the same device).
    compute_dtype : torch.dtype, optional
        dtype of the products G += A A^T: None (default) multiplies float64 batches in float64
        and everything else in float32; torch.float64 forces float64.
    chunk : int
        At most this many entries (columns) per product (default 8192).

    Attributes
    ----------
    G : Tensor (N, N) float64, sum over entries of u_j u_l (exactly symmetric)
    b : Tensor (N,) float64, sum over entries of u_j y
    yy : float, sum of y^2
    count : int, number of entries M summed
    u_sum : Tensor (N,) float64, sum over entries of u_j; y_sum : float, sum of y
        (with count, the means, e.g. to centre the problem; not needed by the dense loss)

    Examples
    --------
    >>> import torch, gfs
    >>> stats = gfs.GramStats(100)
    >>> for _ in range(4):                      # e.g. batches from a DataLoader
    ...     U, y = torch.randn(100, 256), torch.randn(256)
    ...     _ = stats.update(U, y)
    >>> stats.count
    1024
    >>> sel = gfs.select(stats, k=10)
    >>> sel.engine
    'gram'
    """

    def __init__(self, n: int, *, device="cpu", compute_dtype: torch.dtype | None = None, chunk: int = DEFAULT_CHUNK):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int (the number of candidates), got {n!r}")
        if compute_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be None, torch.float32 or torch.float64, got {compute_dtype!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive int (entries per product), got {chunk!r}")
        self.device = torch.device(device)
        f64 = dict(dtype=torch.float64, device=self.device)
        self.G = torch.zeros(n, n, **f64)
        self.b = torch.zeros(n, **f64)
        self.u_sum = torch.zeros(n, **f64)
        self.yy = 0.0
        self.y_sum = 0.0
        self.count = 0
        self.compute_dtype = compute_dtype
        self.chunk = chunk
        # the least precise product dtype that went into G (sets rounding tolerances)
        self.precision: torch.dtype = torch.float64

    # -- building ---------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.b.shape[0]

    @classmethod
    def from_features(cls, features, targets, **kwargs) -> "GramStats":
        """Statistics of one features matrix (N, M) or (N, *S) and its targets."""
        U = check.as_tensor(features, "features")
        if U.dim() < 2:
            raise ValueError(
                f"features must have shape (N, M) or (N, *S) with one row per candidate; got shape {tuple(U.shape)}"
            )
        kwargs.setdefault("device", U.device)
        return cls(int(U.shape[0]), **kwargs).update(U, targets, _names=("features", "targets"))

    def update(self, features_batch, targets_batch, *, _names=("features_batch", "targets_batch"),
               _trusted=False) -> "GramStats":
        """Add one batch: features_batch (N, m) or (N, *S), targets_batch (m,) or S. Returns self.

        The batch is not modified; it must be finite and on this statistics' device.
        """
        fname, tname = _names
        U = check.as_tensor(features_batch, fname)
        if targets_batch is None:
            raise ValueError(
                f"{tname} is missing: pass the target output for this batch (shape {tuple(U.shape[1:])} "
                f"or (m,)), e.g. the dense layer's output"
            )
        y = check.as_tensor(targets_batch, tname)
        check.check_dtype(U, fname)
        check.check_dtype(y, tname)
        if U.dim() < 2 or U.shape[0] != self.n:
            raise ValueError(
                f"{fname} has shape {tuple(U.shape)} but these GramStats were built for n={self.n} candidates; "
                f"pass a batch of shape ({self.n}, m) or ({self.n}, *S), one row per candidate"
            )
        m = math.prod(U.shape[1:])
        if m == 0:
            return self
        if tuple(y.shape) != tuple(U.shape[1:]) and tuple(y.shape) != (m,):
            raise ValueError(
                f"{tname} has shape {tuple(y.shape)} but {fname} has shape {tuple(U.shape)}; "
                f"{tname} must have shape {tuple(U.shape[1:])} or ({m},)"
            )
        for x, name in ((U, fname), (y, tname)):
            if x.device != self.device:
                raise ValueError(
                    f"{name} is on {x.device} but these GramStats live on {self.device}; "
                    f"move the batch ({name}.to('{self.device}')) or build GramStats(n, device='{x.device}')"
                )
        U = U.reshape(self.n, m)
        y = y.reshape(m)
        if not _trusted:  # (gfs.select has checked them already)
            check.check_finite(U, fname)
            check.check_finite(y, tname)
        cdt = self.compute_dtype or (torch.float64 if U.dtype == torch.float64 else torch.float32)
        if cdt == torch.float32:
            self.precision = torch.float32
        y64 = y.double()
        for c0 in range(0, m, self.chunk):
            A = U[:, c0 : c0 + self.chunk].to(cdt)
            _gram_add(self.G, A)
            yc = y64[c0 : c0 + self.chunk].to(cdt)
            self.b += A @ yc
            self.u_sum += A.sum(1)
        self.yy += float(y64 @ y64)
        self.y_sum += float(y64.sum())
        self.count += m
        return self

    # -- combining --------------------------------------------------------------------------
    def merge(self, other: "GramStats") -> "GramStats":
        """Add another GramStats of the same N (e.g. another worker's) into this one. Returns self."""
        if not isinstance(other, GramStats):
            raise TypeError(f"other must be a GramStats, got {type(other).__name__}")
        if other.n != self.n:
            raise ValueError(
                f"cannot merge GramStats of n={other.n} candidates into n={self.n}: both must describe the same candidates"
            )
        self.G += other.G.to(self.device)
        self.b += other.b.to(self.device)
        self.u_sum += other.u_sum.to(self.device)
        self.yy += other.yy
        self.y_sum += other.y_sum
        self.count += other.count
        if other.precision == torch.float32:
            self.precision = torch.float32
        return self

    def all_reduce(self, group=None) -> "GramStats":
        """Sum these statistics across the processes of a torch.distributed group, in place,
        with one all-reduce (every rank must call it with statistics of the same N). Returns self."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "all_reduce needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group); use merge() to combine statistics in one process"
            )
        n = self.n
        tail = torch.tensor(
            [self.yy, self.y_sum, float(self.count), 1.0 if self.precision == torch.float32 else 0.0],
            dtype=torch.float64, device=self.device,
        )
        flat = torch.cat([self.G.reshape(-1), self.b, self.u_sum, tail])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        self.G.copy_(flat[: n * n].view(n, n))
        self.b.copy_(flat[n * n : n * n + n])
        self.u_sum.copy_(flat[n * n + n : n * n + 2 * n])
        yy, y_sum, count, low = flat[n * n + 2 * n :].tolist()
        self.yy, self.y_sum, self.count = yy, y_sum, int(round(count))
        if low > 0:
            self.precision = torch.float32
        return self

    # -- storage ----------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write to `path` with torch.save (a version-tagged dict of tensors and numbers)."""
        torch.save(
            {
                "format": FORMAT,
                "version": VERSION,
                "n": self.n,
                "G": self.G.cpu(),
                "b": self.b.cpu(),
                "u_sum": self.u_sum.cpu(),
                "yy": float(self.yy),
                "y_sum": float(self.y_sum),
                "count": int(self.count),
                "precision": str(self.precision).removeprefix("torch."),
                "chunk": int(self.chunk),
            },
            path,
        )

    @classmethod
    def load(cls, path, *, device="cpu") -> "GramStats":
        """Read statistics written by `save` (torch.load with weights_only=True)."""
        what = f"GramStats file {os.fspath(path)!r}"
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
            raise ValueError(
                f"cannot read {what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                f"(the file is truncated, damaged, or was not written by GramStats.save); write it again with stats.save(path)"
            ) from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{what} is not a GramStats file (no format tag {FORMAT!r}); write it with stats.save(path)")
        if data.get("version") != VERSION:
            raise ValueError(
                f"{what} has format version {data.get('version')!r}, this gfs reads version {VERSION}; "
                f"rebuild the statistics with this gfs version"
            )
        n = data.get("n")
        expect = {"G": (n, n), "b": (n,), "u_sum": (n,)}
        for key, shape in expect.items():
            t = data.get(key)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{what} is inconsistent: {key} should have shape {shape} for n={n}, got {got}")
        for key in ("yy", "y_sum", "count"):
            if not isinstance(data.get(key), (int, float)):
                raise ValueError(f"{what} is inconsistent: {key} is missing or not a number")
        stats = cls(int(n), device=device, chunk=int(data.get("chunk", DEFAULT_CHUNK)))
        stats.G.copy_(data["G"])
        stats.b.copy_(data["b"])
        stats.u_sum.copy_(data["u_sum"])
        stats.yy, stats.y_sum, stats.count = float(data["yy"]), float(data["y_sum"]), int(data["count"])
        stats.precision = torch.float32 if data.get("precision") == "float32" else torch.float64
        return stats

    def to(self, device) -> "GramStats":
        """A copy on another device."""
        out = GramStats(self.n, device=device, compute_dtype=self.compute_dtype, chunk=self.chunk)
        out.merge(self)
        out.precision = self.precision
        return out

    # -- derived ----------------------------------------------------------------------------
    @property
    def dense_loss(self) -> float:
        """Loss of the dense network (mean_j u_j): (||y||^2 - 2 mean(b) + mean(G)) / count."""
        if self.count == 0:
            return float("nan")
        return (self.yy - 2.0 * float(self.b.mean()) + float(self.G.mean())) / self.count

    @property
    def rtol(self) -> float:
        """Relative rounding level of these statistics (float32 or float64 products)."""
        return 1e-5 if self.precision == torch.float32 else 1e-10

    def validate(self, name: str = "stats", *, full: bool = False) -> None:
        """Raise ValueError, naming the field and the remedy, unless the statistics can drive a
        selection: non-empty, finite, and consistent with a Gram matrix (O(N^2) checks: diag >= 0,
        |G_ij| <= sqrt(G_ii G_jj), b_j^2 <= G_jj ||y||^2). `full=True` also checks that
        [[G, b], [b^T, ||y||^2]] is positive semi-definite (a Cholesky factorisation, O(N^3))."""
        if self.count <= 0:
            raise ValueError(f"{name} is empty (count=0): call {name}.update(features_batch, targets_batch) first")
        fix = "the statistics are corrupted (a damaged file, or batches of other candidates merged in); rebuild them"
        for field_name, x in (("G", self.G), ("b", self.b)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(
                    f"{name}.{field_name} contains NaN or Inf: {fix} "
                    f"(if the data overflow float32, build with compute_dtype=torch.float64)"
                )
        if not math.isfinite(self.yy) or self.yy < 0:
            raise ValueError(f"{name}.yy = {self.yy!r} is not a finite sum of squares: {fix}")
        d = torch.diagonal(self.G)
        scale = float(d.max()) + self.yy / max(1, self.n)
        tol = self.rtol
        if float(d.min()) < -tol * scale:
            j = int(torch.argmin(d))
            raise ValueError(f"{name}.G is not positive semi-definite: G[{j},{j}] = {float(d[j])!r} < 0; {fix}")
        sd = torch.sqrt(d.clamp_min(0))
        rows = max(1, (1 << 18) // self.n)  # row blocks: temporaries stay in cache
        for i0 in range(0, self.n, rows):
            blk = self.G[i0 : i0 + rows].abs()
            blk -= torch.outer(sd[i0 : i0 + rows], sd * (1 + tol))
            worst = float(blk.max())
            if worst > tol * scale:
                i, j = divmod(int(torch.argmax(blk)), self.n)
                i += i0
                raise ValueError(
                    f"{name}.G is not positive semi-definite: |G[{i},{j}]| = {abs(float(self.G[i, j])):.6g} > "
                    f"sqrt(G[{i},{i}] G[{j},{j}]) = {float(sd[i] * sd[j]):.6g}; {fix}"
                )
        bexcess = self.b.abs() - sd * math.sqrt(self.yy) * (1 + tol) - tol * scale
        if float(bexcess.max()) > 0:
            j = int(torch.argmax(bexcess))
            raise ValueError(
                f"{name}.b is inconsistent with G and yy: |b[{j}]| > sqrt(G[{j},{j}] yy) "
                f"(Cauchy-Schwarz); {fix}"
            )
        if full:
            A = torch.empty(self.n + 1, self.n + 1, dtype=torch.float64, device=self.device)
            A[:-1, :-1] = self.G
            A[:-1, -1] = self.b
            A[-1, :-1] = self.b
            A[-1, -1] = self.yy
            shift = 1e3 * tol * (float(torch.diagonal(A).max()) + 1e-300)
            A.diagonal().add_(shift)
            _, info = torch.linalg.cholesky_ex(A)
            if int(info) != 0:
                raise ValueError(
                    f"{name} is not positive semi-definite ([[G, b], [b^T, yy]] has a negative eigenvalue "
                    f"beyond rounding); {fix}"
                )

    def __repr__(self) -> str:
        return (
            f"GramStats(n={self.n}, count={self.count}, device={str(self.device)!r}, "
            f"precision={str(self.precision).removeprefix('torch.')})"
        )


def _gram_add(G: torch.Tensor, A: torch.Tensor) -> None:
    """G += A A^T (float64 G, A in the product dtype), computing only the lower block triangle
    and mirroring it, so G stays exactly symmetric and the product costs about half a GEMM."""
    N = A.shape[0]
    if N <= 2 * _BLOCK:
        P = A @ A.T
        P = (P + P.T) * 0.5  # exact symmetry
        G += P
        return
    for i in range(0, N, _BLOCK):
        i1 = min(N, i + _BLOCK)
        P = A[i:i1] @ A[:i1].T  # (rows i..i1) x (columns 0..i1)
        if i:
            off = P[:, :i]
            G[i:i1, :i] += off
            G[:i, i:i1] += off.T
        D = P[:, i:i1]
        G[i:i1, i:i1] += (D + D.T) * 0.5


__all__ = ["GramStats", "FORMAT", "VERSION"]

"""Sufficient statistics of greedy forward selection: GramStats, and layer helpers.

Every step rule needs only inner products among the candidates and with the target
(DESIGN.md section 2), so a selection can run from

    G = U U^T (N x N),  b = U y (N),  ||y||^2,  count = M (the number of entries summed),

plus, for centring, the sums of each u_j and of y. These are sums over data batches: they are
built streaming from a DataLoader (`update`), combined across workers (`merge`, `all_reduce`),
and stored (`save` / `load`). `gfs.select(stats, k=...)` runs the Gram engine on them.

Precision. G is accumulated in float64. Float64 batches are multiplied in float64; every other
dtype (float32, float16, bfloat16) is multiplied in float32: the products of at most `chunk`
entries (columns, across batches) accumulate in a float32 buffer, which is then added into the
float64 G, so rounding does not grow with the number of batches (per entry, about 1e-6 of
sqrt(G_ii G_jj) for float32). The product is computed on one block triangle only (G is symmetric).
`compute_dtype=torch.float64` forces float64 products. b and the sums of u_j are computed the
same way (chunk products in the product dtype, summed in float64); ||y||^2 and the sum of y in
float64. G is kept exactly symmetric. A batch whose magnitude would overflow or underflow the
product dtype is multiplied by a power of two first and its products by the inverse square
(exact), so finite data of any float32 magnitude give finite, accurate statistics.

Identical candidates get identical statistics. BLAS rounds the products of two identical rows
differently by their position, which would let a later copy of a duplicated candidate win a tie
the lowest index should win; so the rows that are identical in every batch are tracked (an
exact comparison, O(N m) per batch) and their rows of G, b and u_sum are made equal.

The dense network (the uniform average of the u_j) needs no data either: its loss is
(||y||^2 - 2 mean(b) + mean(G)) / count.
"""
from __future__ import annotations

import math
import os
import pickle
import zipfile

import numpy as np
import torch

from . import _validation as check

FORMAT = "gfs.GramStats"
VERSION = 1
DEFAULT_CHUNK = 8192  # entries per float32 product: bounds the float32 summation length


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
        self._G = torch.zeros(n, n, **f64)
        self._acc = _Accumulator(n, self.device)  # products not yet added into G (<= chunk entries)
        self.b = torch.zeros(n, **f64)
        self.u_sum = torch.zeros(n, **f64)
        self.yy = 0.0
        self.y_sum = 0.0
        self.count = 0
        self.compute_dtype = compute_dtype
        self.chunk = chunk
        # the least precise product dtype that went into G (sets rounding tolerances)
        self.precision: torch.dtype = torch.float64
        # rep[j]: the lowest index of a candidate identical to j in every batch so far (zeros
        # before the first batch: all alike); valid while _rep_count == count (statistics added
        # by other means, e.g. layer statistics, make it unknown)
        self._rep = torch.zeros(n, dtype=torch.int64)
        self._rep_count = 0

    # -- building ---------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.b.shape[0]

    @property
    def G(self) -> torch.Tensor:
        """(N, N) float64, exactly symmetric (pending products are added in first)."""
        if self._acc.cols:
            self._acc.flush(self._G)
            self._equalise_duplicates(G=True)
        return self._G

    def _duplicates(self) -> torch.Tensor | None:
        """(members, reps): candidates known identical to a lower one, and that one; None if none."""
        if self._rep_count != self.count or self.count == 0:
            return None
        members = torch.nonzero(self._rep != torch.arange(self.n)).flatten()
        return None if members.numel() == 0 else (members, self._rep[members])

    def _equalise_duplicates(self, G: bool) -> None:
        """Copy each duplicate's statistics from its representative (b, u_sum; and G's rows and
        columns when G=True): values that differ only by rounding become identical."""
        dup = self._duplicates()
        if dup is None:
            return
        members, reps = (t.to(self.device) for t in dup)
        for v in (self.b, self.u_sum):
            v[members] = v[reps]
        if G:
            self._G[members] = self._G[reps]
            self._G[:, members] = self._G[:, reps]

    def _merge_partition(self, rep: torch.Tensor | None, count: int) -> None:
        """Intersect the duplicate partition with another one (None: unknown) covering `count`
        more entries; call before self.count is increased."""
        valid = self._rep_count == self.count and rep is not None
        if valid:
            self._rep = _intersect(self._rep, rep) if self.count else rep.clone()
        self._rep_count = self.count + count if valid else -1

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
               _amax=None) -> "GramStats":
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
        U = U.detach().reshape(self.n, m)
        y = y.detach().reshape(m)
        if _amax is None:  # (gfs.select has checked them already and passes max |U|, |y|)
            _amax = max(check.check_finite(U, fname), check.check_finite(y, tname))
        cdt = self.compute_dtype or (torch.float64 if U.dtype == torch.float64 else torch.float32)
        if cdt == torch.float32:
            self.precision = torch.float32
        e = check.rescale_exponent(_amax, cdt, min(m, self.chunk))
        if e:
            _check_representable(e, fname)
            self._acc.flush(self._G)  # the scaled products are added into G on their own
        y64 = y.double()
        for c0 in range(0, m, self.chunk):
            A = U[:, c0 : c0 + self.chunk].to(cdt)
            yc = y64[c0 : c0 + self.chunk].to(cdt)
            if e:
                A, yc = check.scaled(A, e), check.scaled(yc, e)
            if self._acc.cols + A.shape[1] > self.chunk or self._acc.dtype not in (None, cdt):
                self._acc.flush(self._G)
            self._acc.add(A)
            self.b += _unscale((A @ yc).double(), 2 * e)
            self.u_sum += _unscale(A.sum(1).double(), e)
        if e:
            self._acc.flush(self._G, scale_exponent=2 * e)
        self._merge_partition(identical_rows(U), m)
        self.yy += float(y64 @ y64)
        self.y_sum += float(y64.sum())
        self.count += m
        self._equalise_duplicates(G=not self._acc.cols)
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
        self._merge_partition(other._rep if other._rep_count == other.count else None, other.count)
        self.G.add_(other.G.to(self.device))
        self.b += other.b.to(self.device)
        self.u_sum += other.u_sum.to(self.device)
        self.yy += other.yy
        self.y_sum += other.y_sum
        self.count += other.count
        if other.precision == torch.float32:
            self.precision = torch.float32
        self._equalise_duplicates(G=True)
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
        # the duplicate partitions of all ranks (-1: unknown), intersected
        mine = self._rep if self._rep_count == self.count else torch.full((n,), -1, dtype=torch.int64)
        parts = [torch.empty_like(mine, device=self.device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, mine.to(self.device), group=group)
        rep = None if any(bool((p < 0).any()) for p in parts) else parts[0].cpu()
        for p in parts[1:]:
            rep = None if rep is None else _intersect(rep, p.cpu())
        self.G.copy_(flat[: n * n].view(n, n))
        self.b.copy_(flat[n * n : n * n + n])
        self.u_sum.copy_(flat[n * n + n : n * n + 2 * n])
        yy, y_sum, count, low = flat[n * n + 2 * n :].tolist()
        self.yy, self.y_sum, self.count = yy, y_sum, int(round(count))
        if low > 0:
            self.precision = torch.float32
        self._rep, self._rep_count = (rep, self.count) if rep is not None else (self._rep, -1)
        self._equalise_duplicates(G=True)
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
                # rep[j]: the lowest index of a candidate identical to j (absent: unknown)
                **({"rep": self._rep.clone()} if self._rep_count == self.count else {}),
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
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{what} is inconsistent: n = {n!r} is not a positive number of candidates")
        # sizes are checked against the bytes the file really holds before anything of size n is
        # allocated (a tensor can claim any shape over a tiny storage with zero strides)
        for key, shape in {"G": (n, n), "b": (n,), "u_sum": (n,)}.items():
            _check_stored_tensor(data.get(key), key, shape, torch.float64, what)
        for key in ("yy", "y_sum"):
            v = data.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{what} is inconsistent: {key} is missing or not a finite number")
        count, chunk = data.get("count"), data.get("chunk", DEFAULT_CHUNK)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{what} is inconsistent: count = {count!r} is not a number of entries (an int >= 0)")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"{what} is inconsistent: chunk = {chunk!r} is not a positive int")
        if data["yy"] < 0:
            raise ValueError(f"{what} is inconsistent: yy = {data['yy']!r} is a sum of squares and cannot be negative")
        if data.get("precision", "float64") not in ("float32", "float64"):
            raise ValueError(f"{what} is inconsistent: precision {data.get('precision')!r} is not float32 or float64")
        if not torch.equal(data["G"], data["G"].T):
            raise ValueError(f"{what} is inconsistent: G is not symmetric (G = U U^T always is); rebuild the statistics")
        rep = data.get("rep")
        if rep is not None:
            _check_stored_tensor(rep, "rep", (n,), torch.int64, what)
            ar = torch.arange(n)
            if bool((rep < 0).any() or (rep > ar).any()) or not torch.equal(rep[rep], rep):
                raise ValueError(f"{what} is inconsistent: rep is not a partition of the candidates")
        stats = cls(n, device=device, chunk=chunk)
        stats.G.copy_(data["G"])
        stats.b.copy_(data["b"])
        stats.u_sum.copy_(data["u_sum"])
        stats.yy, stats.y_sum, stats.count = float(data["yy"]), float(data["y_sum"]), count
        if rep is not None:
            stats._rep, stats._rep_count = rep.clone(), count
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
            if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):  # (sum: fast path)
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


# -- layer statistics without forming N x M ----------------------------------------------------
#
# The candidates are the input channels of a consumer layer (Linear, or Conv2d with groups=1).
# Channel j's contribution to the layer's output is c_j = W[:, j] * x_j (a Linear), or the
# convolution of input channel j alone with W[:, j] (a Conv2d); the bias-free output is
# sum_j c_j. The candidates are u_j = N c_j (N = number of input channels), so that the dense
# layer is exactly the uniform average mean_j u_j, and a selection's weights w (summing to 1)
# give the pruned layer W'[:, j] = N w_j W[:, j], with the bias kept as it is.
# The target is y = target - bias (the bias is not a candidate: the pruned layer keeps it);
# with target=None it is the dense layer's own bias-free output, sum_j c_j.
#
# With X the (positions x C*K) matrix of input patches (K = kh * kw kernel offsets, K = 1 for a
# Linear or a 1x1 conv) and Wf = W.reshape(C_out, C*K):
#   G_jl = N^2 sum_{k, k'} (Wf^T Wf)[(j,k), (l,k')] (X^T X)[(j,k), (l,k')]     (identity over offsets)
#   b_j  = N sum_k sum_o Wf[o, (j,k)] (Y^T X)[o, (j,k)]        (= G_j. / N when y is the dense output)
# so no tensor of size N x M is formed: the work is O(positions (C K)^2) instead of
# O(positions C_out C^2). For a k x k conv with few outputs (C_out < K roughly) materialising the
# contributions in chunks is cheaper; a small cost model picks (method="auto").

_LAYER_CHUNK_BYTES = 256 << 20  # bound on the temporaries of one chunk of positions


def linear_contributions(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The candidates u_j = N W[:, j] x_j of a Linear layer, materialised: (N, *x.shape[:-1], C_out).
    (For tests and baselines: this is the N x M tensor the layer statistics avoid.)"""
    C = weight.shape[1]
    return C * (x.movedim(-1, 0)[..., None] * weight.T.reshape(C, *([1] * (x.dim() - 1)), -1))


def conv2d_contributions(x, weight, *, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """The candidates u_j = N conv2d(x_j, W[:, j]) of a Conv2d (groups=1), materialised:
    (N, B, C_out, H_out, W_out), one grouped convolution."""
    import torch.nn.functional as F

    C_out, C = weight.shape[:2]
    wg = weight.transpose(0, 1).reshape(C * C_out, 1, *weight.shape[2:])
    out = F.conv2d(x, wg, stride=stride, padding=padding, dilation=dilation, groups=C)
    return C * out.reshape(x.shape[0], C, C_out, *out.shape[2:]).movedim(1, 0)


def linear_stats(x, weight, target=None, bias=None, *, out: GramStats | None = None) -> GramStats:
    """GramStats of a Linear layer's input channels as candidates, without forming N x M.

    Parameters
    ----------
    x : Tensor (..., C_in)
        The layer's input over the calibration batch.
    weight : Tensor (C_out, C_in); bias : Tensor (C_out,), optional
    target : Tensor (..., C_out), optional
        The output to imitate (including the bias, if the layer has one); default: the dense
        layer's own output.
    out : GramStats, optional
        Accumulate into these statistics (n = C_in) and return them; default: new statistics.

    G = N^2 (W^T W) * (X^T X) elementwise (X: the inputs, one row per position); see the module
    notes above for the scaling (u_j = N W[:, j] x_j) and the bias.
    """
    x = _layer_tensor(x, "x")
    weight = _layer_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (C_out, C_in) for a Linear layer, got {tuple(weight.shape)}")
    C_out, C = weight.shape
    if x.dim() < 1 or x.shape[-1] != C:
        raise ValueError(f"x has shape {tuple(x.shape)} but weight {tuple(weight.shape)} takes {C} input features: x must be (..., {C})")
    X = x.reshape(-1, C)
    Y = _layer_target(target, bias, (*x.shape[:-1], C_out), C_out, x.device)
    Y = None if Y is None else Y.reshape(-1, C_out)
    return _patch_stats(X, Y, weight, 1, out, lambda: (X, Y))


def conv2d_stats(x, weight, target=None, bias=None, *, stride=1, padding=0, dilation=1, method="auto",
                 out: GramStats | None = None) -> GramStats:
    """GramStats of a Conv2d layer's input channels as candidates (groups=1).

    method : {"auto", "offsets", "materialise"}
        "offsets": G = N^2 sum over pairs of kernel offsets of (Wf^T Wf) * (X^T X) on the input
        patches (a 1x1 conv is the Linear identity), a few images at a time so the unfolded
        patches stay under 256 MiB; "materialise": the contributions of a chunk of samples at a
        time (one grouped convolution) and their Gram. "auto" picks by `conv2d_method`'s
        cost rule.
    Other parameters as in `linear_stats`; x (B, C_in, H, W), weight (C_out, C_in, kh, kw),
    target (B, C_out, H_out, W_out).
    """
    import torch.nn.functional as F

    x = _layer_tensor(x, "x")
    weight = _layer_tensor(weight, "weight")
    if weight.dim() != 4:
        raise ValueError(f"weight must have shape (C_out, C_in, kh, kw) for a Conv2d, got {tuple(weight.shape)}")
    C_out, C, kh, kw = weight.shape
    if x.dim() != 4 or x.shape[1] != C:
        raise ValueError(
            f"x has shape {tuple(x.shape)} but weight {tuple(weight.shape)} takes {C} input channels: "
            f"x must be (B, {C}, H, W) (for groups > 1 select within each group separately)"
        )
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    H = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    W_ = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if H < 1 or W_ < 1:
        raise ValueError(f"x of spatial size {tuple(x.shape[2:])} is smaller than the kernel {(kh, kw)}")
    Y = _layer_target(target, bias, (x.shape[0], C_out, H, W_), C_out, x.device)
    K, P, S = kh * kw, H * W_, x.shape[0] * H * W_
    if method not in ("auto", "offsets", "materialise"):
        raise ValueError(f"unknown method {method!r}; choose 'auto', 'offsets' or 'materialise'")
    if method == "auto":
        method = conv2d_method(C, C_out, K, S, target is not None)
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    per = max(1, _LAYER_CHUNK_BYTES // max(1, P * C * K * x.element_size()))
    if method == "offsets" and K > 1 and per < x.shape[0]:  # bound the unfolded patches: a few images a call
        stats = out if out is not None else GramStats(C, device=x.device)
        for i in range(0, x.shape[0], per):
            conv2d_stats(x[i : i + per], weight, None if Y is None else Y[i : i + per], None, method="offsets",
                         out=stats, **conv)
        return stats
    if method == "materialise":
        stats = out if out is not None else GramStats(C, device=x.device)
        _check_out(stats, C)
        y = Y if Y is not None else F.conv2d(x, weight, **conv)
        per = max(1, _LAYER_CHUNK_BYTES // max(1, C * C_out * P * 4))
        for i in range(0, x.shape[0], per):
            U = conv2d_contributions(x[i : i + per], weight, **conv)
            stats.update(U.reshape(C, -1), y[i : i + per].reshape(-1), _names=("contributions", "target"))
        return stats
    if kh == kw == 1 and dilation == (1, 1):  # 1x1: positions are rows, no patches to unfold
        xs = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))[:, :, :: stride[0], :: stride[1]]
        X = xs[:, :, :H, :W_].permute(0, 2, 3, 1).reshape(S, C)
    else:
        X = None
    Yf = None if Y is None else Y.reshape(x.shape[0], C_out, P).transpose(1, 2).reshape(S, C_out)

    def patches():
        if X is not None:
            return X, Yf
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (B, C*K, P)
        return cols.transpose(1, 2).reshape(S, C * K), Yf

    return _patch_stats(X, Yf, weight.reshape(C_out, C * K), K, out, patches)


# Grouped convolutions (the materialised contributions) run far below GEMM speed per flop on CPU:
# on a 2-core Xeon, ResNet-50's 3x3 consumers at 224 x 224 with 64 images took 0.8-2.5 s by
# "offsets" and 8-18 s materialised, where the flop counts are about equal.
GROUPED_CONV_SLOWDOWN = 8


def conv2d_method(C: int, C_out: int, K: int, positions: int = 1, has_target: bool = True) -> str:
    """conv2d_stats' "auto" choice for a C -> C_out conv with K kernel offsets over `positions`
    output positions: "offsets" (GEMMs on the patches, ~ positions (C K)^2 / 2 multiply-adds)
    unless materialising (a grouped convolution, ~ positions C C_out K counted
    GROUPED_CONV_SLOWDOWN times, then a Gram of positions C_out C^2 / 2) is cheaper."""
    offsets = positions * (C * K) ** 2 / 2 + C_out * (C * K) ** 2 + (positions * C * K * C_out if has_target else 0)
    materialise = positions * C * C_out * (GROUPED_CONV_SLOWDOWN * K + C / 2)
    return "offsets" if offsets <= materialise else "materialise"


def layer_stats(layer, x, target=None, *, out: GramStats | None = None, **kwargs) -> GramStats:
    """GramStats of an nn.Linear or nn.Conv2d (groups=1) layer's input channels, from its input x
    (and optionally the target output; default the layer's own output)."""
    import torch.nn as nn

    if isinstance(layer, nn.Linear):
        return linear_stats(x, layer.weight.detach(), target, _bias(layer), out=out)
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or not isinstance(layer.padding, tuple) or layer.padding_mode != "zeros":
            raise ValueError(
                f"layer_stats takes Conv2d with groups=1, numeric padding and padding_mode='zeros'; got {layer}"
            )
        return conv2d_stats(x, layer.weight.detach(), target, _bias(layer), stride=layer.stride,
                            padding=layer.padding, dilation=layer.dilation, out=out, **kwargs)
    raise TypeError(f"layer_stats takes nn.Linear or nn.Conv2d, got {type(layer).__name__}")


def _bias(layer):
    return None if layer.bias is None else layer.bias.detach()


def _layer_tensor(t, name):
    t = check.as_tensor(t, name)
    check.check_dtype(t, name)
    check.check_finite(t, name)
    return t.detach()


def _layer_target(target, bias, shape, C_out, device):
    """y = target - bias, shaped like the layer output; None for the dense output (no data needed)."""
    if target is None:
        return None
    y = _layer_tensor(target, "target")
    if tuple(y.shape) != tuple(shape):
        raise ValueError(f"target has shape {tuple(y.shape)} but the layer's output has shape {tuple(shape)}")
    if y.device != device:
        raise ValueError(f"target is on {y.device} but x is on {device}; move both to one device")
    if bias is not None:
        bias = _layer_tensor(bias, "bias")
        if tuple(bias.shape) != (C_out,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({C_out},)")
        view = (C_out,) if len(shape) != 4 else (C_out, 1, 1)
        y = y - bias.to(y.dtype).reshape(view)
    return y


def _check_out(stats, C):
    if not isinstance(stats, GramStats) or stats.n != C:
        got = f"n={stats.n}" if isinstance(stats, GramStats) else type(stats).__name__
        raise ValueError(f"out must be GramStats of n={C} candidates (the layer's input channels), got {got}")


def _patch_stats(X, Y, Wf, K, out, patches) -> GramStats:
    """Accumulate the statistics of a layer from its input patches (S, C*K), target (S, C_out) or
    None (dense output), and flattened weight Wf (C_out, C*K); K kernel offsets per channel."""
    C_out, CK = Wf.shape
    C = CK // K
    Xp, Yp = patches()
    S = Xp.shape[0]
    stats = out if out is not None else GramStats(C, device=Xp.device)
    _check_out(stats, C)
    if Xp.device != stats.device:
        raise ValueError(f"x is on {Xp.device} but out lives on {stats.device}")
    cdt = stats.compute_dtype or (torch.float64 if Xp.dtype == torch.float64 else torch.float32)
    if cdt == torch.float32:
        stats.precision = torch.float32
    rows = max(1, min(stats.chunk, _LAYER_CHUNK_BYTES // max(1, 4 * (CK + C_out))))
    # inputs, weights or targets whose products would overflow or underflow the product dtype
    # are multiplied by powers of two (exact), and the float64 sums scaled back
    ex, ew, ey = (check.rescale_exponent(_amax(t), cdt, n) if t is not None else 0
                  for t, n in ((Xp, min(S, stats.chunk)), (Wf, C_out), (Yp, min(S, stats.chunk))))
    for e, name in ((ex, "x"), (ew, "weight"), (ey, "target")):
        if e:
            _check_representable(e, name)
    Wc = Wf.to(cdt)
    A = torch.zeros(CK, CK, dtype=torch.float64, device=Xp.device)
    _gram_add(A, check.scaled(Wc, ew).T if ew else Wc.T)  # Wf^T Wf
    Bx = torch.zeros(CK, CK, dtype=torch.float64, device=Xp.device)
    acc = _Accumulator(CK, Xp.device)
    yty = ysum = 0.0
    YtX = torch.zeros(C_out, CK, dtype=torch.float64, device=Xp.device) if Yp is not None else None
    xsum = torch.zeros(CK, dtype=torch.float64, device=Xp.device)
    for r0 in range(0, S, rows):
        Xc = Xp[r0 : r0 + rows].to(cdt)
        if ex:
            Xc = check.scaled(Xc, ex)
        if acc.cols + Xc.shape[0] > stats.chunk:
            acc.flush(Bx)
        acc.add(Xc.T)  # X^T X
        xsum += Xc.sum(0)
        if Yp is not None:
            Yc = Yp[r0 : r0 + rows]
            YtX += (check.scaled(Yc.to(cdt), ey) if ey else Yc.to(cdt)).T @ Xc
            Y64 = Yc.double()
            yty += float((Y64 * Y64).sum())
            ysum += float(Y64.sum())
    acc.flush(Bx)
    if ex or ew or ey:
        A, Bx, xsum = _unscale(A, 2 * ew), _unscale(Bx, 2 * ex), _unscale(xsum, ex)
        YtX = None if YtX is None else _unscale(YtX, ex + ey)
    N = float(C)
    AB = (A * Bx).reshape(C, K, C, K).sum((1, 3))
    G = (N * N) * AB
    if Yp is None:  # y = mean_j u_j: b = G 1 / N, ||y||^2 = 1^T G 1 / N^2, sum y = sum_j u_sum_j / N
        b = G.sum(1) / N
        yty = float(G.sum()) / (N * N)
    else:
        b = N * (YtX * Wc.double()).sum(0).reshape(C, K).sum(1)
    u_sum = N * (Wc.double().sum(0) * xsum).reshape(C, K).sum(1)
    if Yp is None:
        ysum = float(u_sum.sum()) / N
    G = (G + G.T) * 0.5
    stats.G.add_(G)
    stats.b += b
    stats.u_sum += u_sum
    stats.yy += yty
    stats.y_sum += ysum
    stats.count += S * C_out
    return stats


def _check_stored_tensor(t, key: str, shape: tuple, dtype: torch.dtype, what: str) -> None:
    """Raise unless `t` (from a file) is a dense tensor of this shape and dtype whose storage in
    the file really holds all of its entries."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what} is inconsistent: {key} is missing or not a tensor")
    if tuple(t.shape) != shape:
        raise ValueError(f"{what} is inconsistent: {key} should have shape {shape} for n={shape[0]}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{what} is inconsistent: {key} should be {dtype}, got {t.dtype}")
    held = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
    if not t.is_contiguous() or held < t.numel() * t.element_size():
        raise ValueError(
            f"{what} is inconsistent: {key} claims shape {shape} ({t.numel() * t.element_size():,} bytes) but the file "
            f"holds {max(held, 0):,} bytes for it; the file is damaged or forged"
        )


def identical_rows(A: torch.Tensor) -> torch.Tensor:
    """rep (n,) int64 on the CPU: rep[i] is the lowest index of a row of A exactly equal to row i
    (values compared, so -0.0 == 0.0). Rows are first grouped by a few sampled columns (exact
    values, no arithmetic), then only rows sharing a group are compared in full."""
    n, m = A.shape
    ar = torch.arange(n)
    if n == 1:
        return ar
    cols = torch.unique(torch.linspace(0, m - 1, min(m, 16)).round().long()).to(A.device)
    _, inv = torch.unique(A[:, cols], dim=0, return_inverse=True)
    inv = inv.cpu()
    shared = torch.bincount(inv)[inv] > 1
    if not bool(shared.any()):
        return ar
    rows = torch.nonzero(shared).flatten()
    _, inv = torch.unique(A[rows.to(A.device)], dim=0, return_inverse=True)
    rep = ar.clone()
    rep[rows] = rows[_lowest(inv.cpu())]
    return rep


def _lowest(inv: torch.Tensor) -> torch.Tensor:
    """For class labels inv (n,): the position of the first member of each element's class."""
    n = inv.numel()
    first = torch.full((int(inv.max()) + 1,), n, dtype=torch.int64)
    first.scatter_reduce_(0, inv, torch.arange(n), "amin")
    return first[inv]


def _intersect(rep_a: torch.Tensor, rep_b: torch.Tensor) -> torch.Tensor:
    """The partition of candidates alike in both (each given as lowest-index representatives)."""
    _, inv = torch.unique(torch.stack([rep_a, rep_b], 1), dim=0, return_inverse=True)
    return _lowest(inv)


def _amax(t: torch.Tensor) -> float:
    """max |t| in one reduction (no temporary)."""
    lo, hi = torch.aminmax(t.reshape(-1))
    return max(-float(lo), float(hi))


def _unscale(x: torch.Tensor, e: int) -> torch.Tensor:
    """x * 2^e in float64, in steps whose factors are finite (an overflow gives inf, not NaN)."""
    while e:
        step = max(-1000, min(1000, e))
        x = x * 2.0**step
        e -= step
    return x


def _check_representable(e: int, name: str) -> None:
    """Products of entries near 2^e must be finite, non-zero float64 numbers in G."""
    f64 = np.finfo(np.float64)
    if not (f64.minexp + 2 * (f64.nmant + 1) < 2 * e < f64.maxexp - 64):
        raise ValueError(
            f"{name} has entries of magnitude 2^{e}, whose products {'overflow' if e > 0 else 'underflow'} the "
            f"float64 statistics; multiply features and targets by one common power of two (the selection does "
            f"not change) or use the streaming engine (engine='stream')"
        )


def build_flops(n: int, m: int) -> float:
    """Flops of adding the product of an (n, m) batch (the cost model's unit of Gram-building
    work): the GEMMs of the lower block triangle."""
    bs = _Accumulator.BLOCK if n > _Accumulator.BLOCK else n
    return float(sum(2 * (min(n, i + bs) - i) * min(n, i + bs) * m for i in range(0, n, bs)))


class _Accumulator:
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
            self._flush_numpy(G)
        else:
            self._flush_torch(G, scale_exponent)
        self.cols = 0

    def _blocks(self):
        bs = self.BLOCK if self.n > self.BLOCK else self.n
        return [(i, min(self.n, i + bs)) for i in range(0, self.n, bs)]

    def _flush_numpy(self, G: torch.Tensor) -> None:
        L, Gn = self.buf.numpy(), G.numpy()
        for i, i1 in self._blocks():  # the row blocks of the GEMMs: columns 0..i1 are valid
            D = L[i:i1, i:i1]
            Gn[i:i1, i:i1] += (D + D.T) * 0.5
            for j in range(0, i, self._FLUSH_BLOCK):
                j1 = min(i, j + self._FLUSH_BLOCK)
                blk = L[i:i1, j:j1]
                Gn[i:i1, j:j1] += blk
                Gn[j:j1, i:i1] += blk.T
        L[...] = 0

    def _flush_torch(self, G: torch.Tensor, scale_exponent: int = 0) -> None:
        low = torch.zeros_like(self.buf)
        for i, i1 in self._blocks():
            low[i:i1, :i1] = self.buf[i:i1, :i1]
        diag = _unscale(torch.diagonal(low).to(G.dtype), scale_exponent)
        strict = _unscale(low.tril(-1).to(G.dtype), scale_exponent)
        G += strict + strict.T
        G.diagonal().add_(diag)
        self.buf.zero_()


def _gram_add(G: torch.Tensor, A: torch.Tensor) -> None:
    """G += A A^T (float64 G, A in the product dtype), exactly symmetric."""
    acc = _Accumulator(A.shape[0], A.device)
    acc.add(A)
    acc.flush(G)


__all__ = ["GramStats", "FORMAT", "VERSION", "linear_stats", "conv2d_stats", "layer_stats",
           "linear_contributions", "conv2d_contributions"]

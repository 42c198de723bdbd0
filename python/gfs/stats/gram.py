"""GramStats: the sufficient statistics of greedy forward selection.

Every step rule needs only inner products among the candidates and with the target
(docs/design.md section 2), so a selection can run from

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

Checked once. Statistics that GramStats built itself from checked batches (update, merge,
all_reduce, from_features, to), or that passed `validate`, are remembered as valid together with
their state: the G and b tensors, their in-place version counters (every torch operation that
writes them bumps these), yy and count. `gfs.select` re-validates (O(N^2)) only when that state
changed since, e.g. a loaded file or statistics edited by hand; otherwise its set-up is O(N).
mean(G), for the dense loss, is kept with the same state. Writes that bypass torch (through
`.numpy()` or `.data`) are not seen: call `validate()` after them.
"""

from __future__ import annotations

import math
import os
import pickle
import zipfile

import torch

from .. import _scale
from .. import _validation as check
from ..engines.gram import DEFAULT_CHUNK, Accumulator

FORMAT = "gfs.GramStats"
VERSION = 1


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

    def __init__(
        self,
        n: int,
        *,
        device: str | torch.device = "cpu",
        compute_dtype: torch.dtype | None = None,
        chunk: int = DEFAULT_CHUNK,
    ):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int (the number of candidates), got {n!r}")
        if compute_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be None, torch.float32 or torch.float64, got {compute_dtype!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive int (entries per product), got {chunk!r}")
        self.device = torch.device(device)
        self._G = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        self._acc = Accumulator(n, self.device)  # products not yet added into G (<= chunk entries)
        self.b = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.u_sum = torch.zeros(n, dtype=torch.float64, device=self.device)
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
        # the state (see _state) in which these statistics were last known valid, and mean(G)
        # with the state it was computed in; empty statistics are valid
        self._valid_state: tuple | None = None
        self._gmean: tuple[tuple, float] | None = None
        self._mark_valid()

    # -- the remembered state ---------------------------------------------------------------
    def _state(self) -> tuple:
        """What identifies the statistics' values: G and b (objects and in-place version
        counters), yy, count and the pending products."""
        return (self._G, _version(self._G), self.b, _version(self.b), self.yy, self.count, self._acc.cols)

    def _is(self, state: tuple | None) -> bool:
        now = self._state()
        return (
            state is not None
            and state[0] is now[0]
            and state[2] is now[2]
            and now[1] is not None  # (inference tensors have no version counter: never known)
            and now[3] is not None
            and state[1] == now[1]
            and state[3] == now[3]
            and all(a == b for a, b in zip(state[4:], now[4:], strict=True))  # (a NaN yy never matches)
        )

    def _mark_valid(self) -> None:
        self._valid_state = self._state()

    def _known_valid(self) -> bool:
        return self._is(self._valid_state)

    def _finish(self) -> torch.Tensor:
        """Add the pending products into G (the last part of building it); mean(G) is computed
        with them while the statistics are known valid, so a selection needs no pass over G."""
        if self._acc.cols:
            valid = self._known_valid()
            self._acc.flush(self._G)
            self._equalise_duplicates(G=True)
            if valid:
                self._mark_valid()
                self._mean_of_G()
        return self._G

    def _mean_of_G(self) -> float:
        """mean(G), remembered with the state it was computed in."""
        G = self._finish()
        if self._gmean is None or not self._is(self._gmean[0]):
            self._gmean = (self._state(), float(G.mean()))
        return self._gmean[1]

    # -- building ---------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.b.shape[0]

    @property
    def G(self) -> torch.Tensor:
        """(N, N) float64, exactly symmetric (pending products are added in first)."""
        return self._finish()

    def _duplicates(self) -> tuple[torch.Tensor, torch.Tensor] | None:
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
        if self._rep_count == self.count and rep is not None:
            self._rep = _intersect(self._rep, rep) if self.count else rep.clone()
            self._rep_count = self.count + count
        else:
            self._rep_count = -1

    @classmethod
    def from_features(cls, features, targets, **kwargs) -> GramStats:
        """Statistics of one features matrix (N, M) or (N, *S) and its targets."""
        U = check.as_tensor(features, "features")
        if U.dim() < 2:
            raise ValueError(
                f"features must have shape (N, M) or (N, *S) with one row per candidate; got shape {tuple(U.shape)}"
            )
        kwargs.setdefault("device", U.device)
        stats = cls(int(U.shape[0]), **kwargs).update(U, targets, _names=("features", "targets"))
        stats._finish()  # one batch, nothing more to add: G complete, mean(G) with it
        return stats

    def update(
        self, features_batch, targets_batch, *, _names=("features_batch", "targets_batch"), _amax=None
    ) -> GramStats:
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
        valid = self._known_valid()
        if _amax is None:  # (gfs.select has checked them already and passes max |U|, |y|)
            _amax = max(check.check_finite(U, fname), check.check_finite(y, tname))
        cdt = self.compute_dtype or (torch.float64 if U.dtype == torch.float64 else torch.float32)
        if cdt == torch.float32:
            self.precision = torch.float32
        e = _scale.rescale_exponent(_amax, cdt, min(m, self.chunk))
        if e:
            _scale.check_representable(e, fname)
            self._acc.flush(self._G)  # the scaled products are added into G on their own
        y64 = y.double()
        for c0 in range(0, m, self.chunk):
            A = U[:, c0 : c0 + self.chunk].to(cdt)
            yc = y64[c0 : c0 + self.chunk].to(cdt)
            if e:
                A, yc = _scale.ldexp(A, -e), _scale.ldexp(yc, -e)
            if self._acc.cols + A.shape[1] > self.chunk or self._acc.dtype not in (None, cdt):
                self._acc.flush(self._G)
            self._acc.add(A)
            self.b += _scale.ldexp((A @ yc).double(), 2 * e)
            self.u_sum += _scale.ldexp(A.sum(1).double(), e)
        if e:
            self._acc.flush(self._G, scale_exponent=2 * e)
        self._merge_partition(identical_rows(U), m)
        self.yy += float(y64 @ y64)
        self.y_sum += float(y64.sum())
        self.count += m
        self._equalise_duplicates(G=not self._acc.cols)
        # sums of checked, finite batches (rescaled ones too: their products are finite float64
        # numbers, check_representable) stay valid
        if valid:
            self._mark_valid()
        return self

    # -- combining --------------------------------------------------------------------------
    def merge(self, other: GramStats) -> GramStats:
        """Add another GramStats of the same N (e.g. another worker's) into this one. Returns self."""
        if not isinstance(other, GramStats):
            raise TypeError(f"other must be a GramStats, got {type(other).__name__}")
        if other.n != self.n:
            raise ValueError(
                f"cannot merge GramStats of n={other.n} candidates into n={self.n}: "
                "both must describe the same candidates"
            )
        valid = self._known_valid() and other._known_valid()
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
        if valid:
            self._mark_valid()
            self._mean_of_G()
        return self

    def centred(self, u_sums: torch.Tensor, y_sums: torch.Tensor, per_block: int) -> GramStats:
        """The statistics of the same problem with the entries' mean removed block by block.

        The entries fall into K blocks of ``per_block`` entries each (e.g. a layer's output
        channels, each over the same positions); ``u_sums`` (N, K) holds the sum of u_j over each
        block, ``y_sums`` (K,) the sum of y. Returns new statistics (self is unchanged) of the
        problem in which every u_j and y has its block mean subtracted: the least-squares fit
        then leaves a constant per block free. G - S S^T / P, b - S t / P, ||y||^2 - ||t||^2 / P
        (the sums over the blocks), in float64; validated by the first selection."""
        S = torch.as_tensor(u_sums).to(device=self.device, dtype=torch.float64)
        t = torch.as_tensor(y_sums).to(device=self.device, dtype=torch.float64)
        if S.dim() != 2 or S.shape[0] != self.n or t.shape != (S.shape[1],):
            raise ValueError(
                f"u_sums must be (n={self.n}, K) and y_sums (K,), got {tuple(S.shape)} and {tuple(t.shape)}"
            )
        if isinstance(per_block, bool) or not isinstance(per_block, int) or per_block < 1:
            raise ValueError(f"per_block must be a positive int (entries in each block), got {per_block!r}")
        out = GramStats(self.n, device=self.device, compute_dtype=self.compute_dtype, chunk=self.chunk)
        G = self.G - S @ S.T / per_block
        out._G.copy_((G + G.T) / 2)  # (exactly symmetric)
        out.b.copy_(self.b - S @ t / per_block)
        out.yy = max(0.0, float(self.yy - float(t @ t) / per_block))
        out.u_sum.copy_(self.u_sum - S.sum(1))  # (0 up to rounding)
        out.y_sum = float(self.y_sum - float(t.sum()))
        out.count = self.count
        out.precision = self.precision
        out._valid_state = None  # a derived problem: validated by the first selection
        return out

    def all_reduce(self, group=None) -> GramStats:
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
            [
                self.yy,
                self.y_sum,
                float(self.count),
                1.0 if self.precision == torch.float32 else 0.0,
                0.0 if self._known_valid() else 1.0,  # ranks whose statistics are not known valid
            ],
            dtype=torch.float64,
            device=self.device,
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
        yy, y_sum, count, low, unknown = flat[n * n + 2 * n :].tolist()
        self.yy, self.y_sum, self.count = yy, y_sum, int(round(count))
        if low > 0:
            self.precision = torch.float32
        self._rep, self._rep_count = (rep, self.count) if rep is not None else (self._rep, -1)
        self._equalise_duplicates(G=True)
        if unknown == 0:  # every rank's statistics were built by GramStats (or validated)
            self._mark_valid()
            self._mean_of_G()
        else:
            self._valid_state = None
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
    def load(cls, path, *, device="cpu") -> GramStats:
        """Read statistics written by `save` (torch.load with weights_only=True)."""
        what = f"GramStats file {os.fspath(path)!r}"
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
            raise ValueError(
                f"cannot read {what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                "(the file is truncated, damaged, or was not written by GramStats.save); "
                "write it again with stats.save(path)"
            ) from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(
                f"{what} is not a GramStats file (no format tag {FORMAT!r}); write it with stats.save(path)"
            )
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
            raise ValueError(
                f"{what} is inconsistent: G is not symmetric (G = U U^T always is); rebuild the statistics"
            )
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
        stats._valid_state = None  # a file: validated by the first selection (or validate())
        return stats

    def to(self, device) -> GramStats:
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
        return (self.yy - 2.0 * float(self.b.mean()) + self._mean_of_G()) / self.count

    @property
    def rtol(self) -> float:
        """Relative rounding level of these statistics (float32 or float64 products)."""
        return 1e-5 if self.precision == torch.float32 else 1e-10

    def validate(self, name: str = "stats", *, full: bool = False) -> None:
        """Raise ValueError, naming the field and the remedy, unless the statistics can drive a
        selection: non-empty, finite, and consistent with a Gram matrix (O(N^2) checks: diag >= 0,
        |G_ij| <= sqrt(G_ii G_jj), b_j^2 <= G_jj ||y||^2). `full=True` also checks that
        [[G, b], [b^T, ||y||^2]] is positive semi-definite (a Cholesky factorisation, O(N^3)).

        Statistics that pass are remembered as valid until they change (see the module
        docstring), so that `gfs.select` does not check them again."""
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
                f"{name}.b is inconsistent with G and yy: |b[{j}]| > sqrt(G[{j},{j}] yy) (Cauchy-Schwarz); {fix}"
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
        self._mark_valid()

    def _check_for_selection(self, name: str = "stats") -> None:
        """`validate` (O(N^2)) unless these statistics are known valid in their present state
        (built by GramStats from checked batches, or validated, and unchanged since); then only
        the O(N) checks."""
        self._finish()
        if not self._known_valid():
            self.validate(name)
            return
        if self.count <= 0:
            raise ValueError(f"{name} is empty (count=0): call {name}.update(features_batch, targets_batch) first")
        d = torch.diagonal(self._G)
        if not (math.isfinite(self.yy) and math.isfinite(float(d.sum())) and math.isfinite(float(self.b.sum()))):
            self.validate(name)  # an overflow in float64 sums: say where

    def __repr__(self) -> str:
        return (
            f"GramStats(n={self.n}, count={self.count}, device={str(self.device)!r}, "
            f"precision={str(self.precision).removeprefix('torch.')})"
        )


def _version(t: torch.Tensor) -> int | None:
    """t's in-place version counter (None for inference tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _check_stored_tensor(t, key: str, shape: tuple, dtype: torch.dtype, what: str) -> None:
    """Raise unless `t` (from a file) is a dense tensor of this shape and dtype whose storage in
    the file really holds all of its entries."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what} is inconsistent: {key} is missing or not a tensor")
    if tuple(t.shape) != shape:
        raise ValueError(
            f"{what} is inconsistent: {key} should have shape {shape} for n={shape[0]}, got {tuple(t.shape)}"
        )
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

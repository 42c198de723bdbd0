"""Layer statistics: GramStats of a Linear or Conv2d layer's input channels as candidates,
without forming the N x M contributions (docs/design.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _scale
from .. import _validation as check
from ..engines.cost import conv2d_method
from ..engines.gram import Accumulator, gram_add
from .gram import GramStats

## The candidates are the input channels of a consumer layer (Linear, or Conv2d with groups=1).
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
# a 1x1 conv with at least this many positions an image takes X^T X and Y^T X as batched products
# of each image's (C, H W) block, read in place; smaller images, as rows of one channels-last copy
_POINTWISE_MIN_POSITIONS = 128


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
        raise ValueError(
            f"x has shape {tuple(x.shape)} but weight {tuple(weight.shape)} takes {C} input features: "
            f"x must be (..., {C})"
        )
    X = x.reshape(-1, C)
    Y = _layer_target(target, bias, (*x.shape[:-1], C_out), C_out, x.device)
    Y = None if Y is None else Y.reshape(-1, C_out)
    return _patch_stats(X, Y, weight, 1, out, lambda: (X, Y))


def conv2d_stats(
    x, weight, target=None, bias=None, *, stride=1, padding=0, dilation=1, method="auto", out: GramStats | None = None
) -> GramStats:
    """GramStats of a Conv2d layer's input channels as candidates (groups=1).

    method : {"auto", "offsets", "shifts", "materialise"}
        "offsets": G = N^2 sum over pairs of kernel offsets of (Wf^T Wf) * (X^T X) on the input
        patches (a 1x1 conv is the Linear identity), a few images at a time so the unfolded
        patches stay under 256 MiB; "shifts": the same sums from one C x C product per phase of
        the stride and shift between offsets (stride 1, 3x3: 13 instead of 45 offset pairs) with
        the image border corrected exactly (module notes); "materialise": the contributions of a chunk of
        samples at a time (one grouped convolution) and their Gram. "auto" picks by
        `conv2d_method`'s cost rule.
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
    if method not in ("auto", "offsets", "materialise", "shifts"):
        raise ValueError(f"unknown method {method!r}; choose 'auto', 'offsets', 'materialise' or 'shifts'")
    plan = None
    if method == "shifts" or (method == "auto" and K > 1):  # (a 1x1 conv: no shifts to share)
        plan = _shift_plan(x.shape[2], x.shape[3], kh, kw, stride, padding, dilation, H, W_)
    if method == "auto":
        shift_rows = None if plan is None else plan.rows(x.shape[0])
        method = conv2d_method(C, C_out, K, S, target is not None, shift_rows=shift_rows)
    if method == "shifts":
        if plan is None:  # (the rule chose shifts for a 1x1 conv)
            plan = _shift_plan(x.shape[2], x.shape[3], kh, kw, stride, padding, dilation, H, W_)
        done = _shift_stats(x, Y, weight, plan, padding, dilation, H, W_, out)
        if done is not None:
            return done
        method = "offsets"  # data that need rescaling: the offsets path does it
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    per = max(1, _LAYER_CHUNK_BYTES // max(1, P * C * K * x.element_size()))
    if method == "offsets" and K > 1 and per < x.shape[0]:  # bound the unfolded patches: a few images a call
        stats = out if out is not None else GramStats(C, device=x.device)
        for i in range(0, x.shape[0], per):
            conv2d_stats(
                x[i : i + per], weight, None if Y is None else Y[i : i + per], None, method="offsets", out=stats, **conv
            )
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
    if K == 1 and stride == (1, 1) and padding == (0, 0) and P >= _POINTWISE_MIN_POSITIONS:
        done = _pointwise_stats(x, Y, weight, out)
        if done is not None:
            return done
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
        return conv2d_stats(
            x,
            layer.weight.detach(),
            target,
            _bias(layer),
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            out=out,
            **kwargs,
        )
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
    ex, ew, ey = (
        _scale.rescale_exponent(_amax(t), cdt, n) if t is not None else 0
        for t, n in ((Xp, min(S, stats.chunk)), (Wf, C_out), (Yp, min(S, stats.chunk)))
    )
    for e, name in ((ex, "x"), (ew, "weight"), (ey, "target")):
        if e:
            _scale.check_representable(e, name)
    Wc = Wf.to(cdt)
    A = torch.zeros(CK, CK, dtype=torch.float64, device=Xp.device)
    gram_add(A, _scale.ldexp(Wc, -ew).T if ew else Wc.T)  # Wf^T Wf
    Bx = torch.zeros(CK, CK, dtype=torch.float64, device=Xp.device)
    acc = Accumulator(CK, Xp.device)
    yty = ysum = 0.0
    YtX = torch.zeros(C_out, CK, dtype=torch.float64, device=Xp.device) if Yp is not None else None
    xsum = torch.zeros(CK, dtype=torch.float64, device=Xp.device)
    for r0 in range(0, S, rows):
        Xc = Xp[r0 : r0 + rows].to(cdt)
        if ex:
            Xc = _scale.ldexp(Xc, -ex)
        if acc.cols + Xc.shape[0] > stats.chunk:
            acc.flush(Bx)
        acc.add(Xc.T)  # X^T X
        xsum += Xc.sum(0)
        if Yp is not None:
            Yc = Yp[r0 : r0 + rows]
            YtX += (_scale.ldexp(Yc.to(cdt), -ey) if ey else Yc.to(cdt)).T @ Xc
            Y64 = Yc.double()
            yty += float((Y64 * Y64).sum())
            ysum += float(Y64.sum())
    acc.flush(Bx)
    if ex or ew or ey:
        A, Bx, xsum = _scale.ldexp(A, 2 * ew), _scale.ldexp(Bx, 2 * ex), _scale.ldexp(xsum, ex)
        YtX = None if YtX is None else _scale.ldexp(YtX, ex + ey)
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
    return _accumulate(stats, (G + G.T) * 0.5, b, u_sum, yty, ysum, S * C_out)


def _accumulate(stats, G, b, u_sum, yy, y_sum, count) -> GramStats:
    """Add one layer's (or batch's) sums into ``stats`` and return them."""
    stats.G.add_(G)
    stats.b += b
    stats.u_sum += u_sum
    stats.yy += yy
    stats.y_sum += y_sum
    stats.count += count
    return stats


def _amax(t: torch.Tensor) -> float:
    """max |t| in one reduction (no temporary)."""
    lo, hi = torch.aminmax(t.reshape(-1))
    return max(-float(lo), float(hi))


## Shifted products instead of offset pairs.
# A conv of stride s reads, at output o and kernel offset a, the input at s*o + d*a - p. Split
# the input into its s x s phases X_r[q] = x[s q + r] (r in [0, s)^2): offset a reads phase
# r(a) = (d*a - p) mod s at q = o + c(a), c(a) = (d*a - p - r(a)) / s. So
# (X^T X)[(j,a), (l,a')] = sum over o of X_r(a)[o + c(a), j] X_r(a')[o + c(a'), l] (zero outside a
# phase): summed over a whole phase image it depends only on (r(a), r(a'), c(a') - c(a)), one
# C x C product per such key instead of one per pair of offsets (stride 1: one phase, 13 shifts
# for a 3x3 kernel instead of 45 pairs, each over the whole image; stride 2, 3x3: 34 keys over
# phases a quarter the size, about the work of the 45 pairs over the outputs, and "auto"
# chooses by that work).
# The rows offset a reads differ from the whole phase image only in a few border rows and
# columns, whose products are subtracted exactly (or, where the border is the larger part, the
# rectangle read is summed directly). Where zero padding adds little (large images) a key's
# whole-image product is one GEMM over the phase images laid out channels-last with zero rows
# and columns after each image and a zero margin at both ends, flattened: a flat shift pairs each
# position with the position t away or with a zero, never a wrong neighbour, and needs no copy;
# small images take the exact rectangles instead.


@dataclass
class _ShiftPlan:
    """How `_shift_stats` sums a conv's offset pairs: ``pairs``, one per unordered pair of kernel
    offsets (index a, index a2, key, whole, rect, border): key = (r, r2, t) the phases of a and
    a2 and the shift t = c(a2) - c(a) (oriented so that key <= the transposed key), whole = the
    rectangle (y0, y1, x0, x1) of phase-r positions q with q + t inside phase r2, rect = the part
    offset a reads, border = whole minus rect as rectangles (None where summing rect directly is
    cheaper); ``phases`` {r: (rows, cols)}; ``padded`` (rows, cols) of each image in the flat
    layout, or None (exact rectangles)."""

    stride: tuple
    pairs: list
    phases: dict
    padded: tuple | None

    def rows(self, images: int) -> int:
        """Positions the plan's C x C products run over for ``images`` images: each key's
        whole-image product (over the padded layout, or its rectangle) and each distinct border
        or direct rectangle once."""
        area = lambda r: (r[1] - r[0]) * (r[3] - r[2])  # noqa: E731
        wholes = {(key, whole) for _, _, key, whole, _, border in self.pairs if border is not None}
        rects = {
            (key, r) for _, _, key, _, rect, border in self.pairs for r in (border if border is not None else [rect])
        }
        per_image = self.padded[0] * self.padded[1] if self.padded else 0
        whole = len(wholes) * per_image if self.padded else sum(area(r) for _, r in wholes)
        return images * (whole + sum(area(r) for _, r in rects))


def _shift_plan(H, W, kh, kw, stride, padding, dilation, H_out, W_out) -> _ShiftPlan:
    """The `_ShiftPlan` of a conv (kernel kh x kw, stride, padding, dilation) over H x W inputs."""
    area = lambda r: (r[1] - r[0]) * (r[3] - r[2])  # noqa: E731

    def axis(k, s, p, d, n):  # per kernel offset along one axis: (phase, coarse offset)
        return [((d * a - p) % s, (d * a - p) // s) for a in range(k)]

    ys, xs = axis(kh, stride[0], padding[0], dilation[0], H), axis(kw, stride[1], padding[1], dilation[1], W)
    offs = [(ys[ay], xs[ax]) for ay in range(kh) for ax in range(kw)]
    size = lambda r, s, n: max(0, (n - r + s - 1) // s)  # noqa: E731  (positions of phase r)
    phases = {
        (ry, rx): (size(ry, stride[0], H), size(rx, stride[1], W)) for ry in range(stride[0]) for rx in range(stride[1])
    }
    pairs = []
    for i, (ya, xa) in enumerate(offs):
        for i2 in range(i, len(offs)):
            (ya2, xa2) = offs[i2]
            a, a2 = (i, (ya, xa)), (i2, (ya2, xa2))
            key = ((ya[0], xa[0]), (ya2[0], xa2[0]), (ya2[1] - ya[1], xa2[1] - xa[1]))
            flipped = (key[1], key[0], (-key[2][0], -key[2][1]))
            if flipped < key:  # sum from a2's side: A(a, a2) is the transpose
                a, a2, key = a2, a, flipped
            (ry, rx), r2, (t0, t1) = key
            (Hr, Wr), (Hr2, Wr2) = phases[(ry, rx)], phases[r2]
            v0, v1 = max(0, -t0), min(Hr, Hr2 - t0)
            w0, w1 = max(0, -t1), min(Wr, Wr2 - t1)
            v1, w1 = max(v0, v1), max(w0, w1)
            cy, cx = ys[a[0] // kw][1], xs[a[0] % kw][1]  # the coarse offset of a: it reads q = o + c
            y0, x0 = max(v0, cy), max(w0, cx)
            y1, x1 = max(y0, min(v1, cy + H_out)), max(x0, min(w1, cx + W_out))
            rect = (y0, y1, x0, x1)
            border = [(v0, y0, w0, w1), (y1, v1, w0, w1), (y0, y1, w0, x0), (y0, y1, x1, w1)]
            border = [r for r in border if r[1] > r[0] and r[3] > r[2]]
            cheaper = sum(map(area, border)) < area(rect)  # (a key's whole-image sum serves all its pairs)
            pairs.append((a[0], a2[0], key, (v0, v1, w0, w1), rect, border if cheaper else None))
    Hm, Wm = max(h for h, _ in phases.values()), max(w for _, w in phases.values())
    ty, tx = (max((abs(p[2][2][i]) for p in pairs), default=0) for i in (0, 1))
    padded: tuple | None = (Hm + ty, Wm + tx)
    if (Hm + ty) * (Wm + tx) > 1.25 * sum(h * w for h, w in phases.values()) / len(phases):
        padded = None
    return _ShiftPlan(tuple(stride), pairs, phases, padded)


def _shift_stats(x, Y, weight, plan: _ShiftPlan, padding, dilation, H_out, W_out, out) -> GramStats | None:
    """conv2d_stats by shifted products (module notes above). None where the data need
    rescaling (the offsets path does that)."""
    import torch.nn.functional as F
    from torch.nn.grad import conv2d_weight

    B, C, H, W = x.shape
    C_out, _, kh, kw = weight.shape
    K, S = kh * kw, B * H_out * W_out
    stats, cdt = _shift_setup(x, Y, weight, out, S)
    if stats is None:
        return None
    chunk = stats.chunk
    f64 = dict(dtype=torch.float64, device=x.device)
    sy, sx = plan.stride
    # each phase channels-last, (B, rows, cols, C); in the flat layout, with zero rows and columns
    # after each image and a zero margin at both ends (the largest flat shift)
    Hp, Wp = plan.padded or (0, 0)
    margin = Hp * Wp
    flat, phase = {}, {}
    for r, (hr, wr) in plan.phases.items():
        src = x[:, :, r[0] :: sy, r[1] :: sx].permute(0, 2, 3, 1)
        if plan.padded:
            Z = torch.zeros(2 * margin + B * Hp * Wp, C, dtype=cdt, device=x.device)
            phase[r] = Z[margin : margin + B * Hp * Wp].view(B, Hp, Wp, C)[:, :hr, :wr]
            flat[r] = Z
        else:
            phase[r] = torch.empty(B, hr, wr, C, dtype=cdt, device=x.device)
        phase[r].copy_(src)
    sums: dict[tuple, torch.Tensor] = {}

    def region(key, rect) -> torch.Tensor:
        """sum over q in rect of every image of X_r[q] X_r2[q + t]^T: float64, the products in the
        compute dtype over at most `chunk` positions each."""
        if (key, rect) not in sums:
            r, r2, t = key
            y0, y1, x0, x1 = rect
            acc = torch.zeros(C, C, **f64)
            if y1 > y0 and x1 > x0:
                rows = max(1, min(y1 - y0, chunk // (x1 - x0)))  # rows of one image per product
                per = max(1, chunk // (rows * (x1 - x0)))  # images per product
                for i in range(0, B, per):
                    for q0 in range(y0, y1, rows):
                        q1 = min(y1, q0 + rows)
                        P = phase[r][i : i + per, q0:q1, x0:x1].reshape(-1, C)
                        Q = phase[r2][i : i + per, q0 + t[0] : q1 + t[0], x0 + t[1] : x1 + t[1]].reshape(-1, C)
                        acc += (P.T @ Q).double()
            sums[(key, rect)] = acc
        return sums[(key, rect)]

    def whole_image(key, rect) -> torch.Tensor:
        """region(key, rect) for rect the whole-image rectangle of key: one GEMM a chunk of the
        flat layout where the plan takes it."""
        if plan.padded is None:
            return region(key, rect)
        if (key, rect) not in sums:
            r, r2, t = key
            off, n = t[0] * Wp + t[1], B * Hp * Wp
            acc = torch.zeros(C, C, **f64)
            for q0 in range(margin, margin + n, chunk):
                q1 = min(margin + n, q0 + chunk)
                acc += (flat[r][q0:q1].T @ flat[r2][q0 + off : q1 + off]).double()
            sums[(key, rect)] = acc
        return sums[(key, rect)]

    Wk = weight.to(cdt).reshape(C_out, C, K)
    Wt = Wk.permute(2, 1, 0).contiguous()  # (K, C, C_out)
    Gh = torch.zeros(C, C, **f64)
    for ia, ia2, key, whole, rect, border in plan.pairs:
        if border is None:
            A = region(key, rect)
        else:
            A = whole_image(key, whole).clone()
            for r in border:
                A -= region(key, r)
        M = (Wt[ia] @ Wt[ia2].T).double()  # (W^T W)[(j,a), (l,a2)]: C_out terms
        Gh.addcmul_(M, A, value=0.5 if ia == ia2 else 1.0)
    G = Gh + Gh.T
    # each offset's patch entries summed: its phase summed over the rectangle the offset reads
    cums = {r: F.pad(p.sum(0, dtype=torch.float64).cumsum(0).cumsum(1), (0, 0, 1, 0, 1, 0)) for r, p in phase.items()}
    xsum = torch.zeros(C, K, **f64)
    for ay in range(kh):
        for ax in range(kw):
            r = ((dilation[0] * ay - padding[0]) % sy, (dilation[1] * ax - padding[1]) % sx)
            cy, cx = (dilation[0] * ay - padding[0]) // sy, (dilation[1] * ax - padding[1]) // sx
            hr, wr = plan.phases[r]
            y0, y1 = max(0, cy), min(hr, cy + H_out)
            x0, x1 = max(0, cx), min(wr, cx + W_out)
            if y1 > y0 and x1 > x0:
                cum = cums[r]
                xsum[:, ay * kw + ax] = cum[y1, x1] - cum[y0, x1] - cum[y1, x0] + cum[y0, x0]
    YtX = None
    if Y is not None:  # Y^T X at every offset is the conv's weight gradient: a few images at a time
        YtX = torch.zeros(C_out, C, kh, kw, **f64)
        per = max(1, chunk // (H_out * W_out))
        for i in range(0, B, per):
            xi, yi = x[i : i + per].to(cdt), Y[i : i + per].to(cdt)
            YtX += conv2d_weight(xi, weight.shape, yi, stride=plan.stride, padding=padding, dilation=dilation).double()
        YtX = YtX.reshape(C_out, C, K)
    return _finish(stats, G, Wk, xsum, YtX, Y, S)


def _pointwise_stats(x, Y, weight, out) -> GramStats | None:
    """conv2d_stats of a 1x1 conv (stride 1, no padding) from each image's (C, H W) block in
    place: X^T X and Y^T X as batched products over at most `chunk` positions each. None where
    the data need rescaling (the general path does that)."""
    B, C, H, W = x.shape
    C_out = weight.shape[0]
    P = H * W
    stats, cdt = _shift_setup(x, Y, weight, out, B * P)
    if stats is None:
        return None
    f64 = dict(dtype=torch.float64, device=x.device)
    xv = x.reshape(B, C, P)
    XtX = torch.zeros(C, C, **f64)
    YtX = torch.zeros(C_out, C, **f64)
    per = max(1, stats.chunk // P)
    for i in range(0, B, per):
        xb = xv[i : i + per].to(cdt)
        XtX += torch.bmm(xb, xb.transpose(1, 2)).sum(0).double()
        if Y is not None:
            YtX += torch.bmm(Y[i : i + per].reshape(-1, C_out, P).to(cdt), xb.transpose(1, 2)).sum(0).double()
    Wk = weight.to(cdt).reshape(C_out, C, 1)
    WtW = (Wk[:, :, 0].T @ Wk[:, :, 0]).double()
    xsum = x.sum((0, 2, 3), dtype=torch.float64).reshape(C, 1)
    return _finish(stats, WtW * XtX, Wk, xsum, None if Y is None else YtX.reshape(C_out, C, 1), Y, B * P)


def _shift_setup(x, Y, weight, out, S):
    """(the statistics to add into, the product dtype) for the shifted / pointwise paths, or
    (None, None) where inputs, weights or targets need rescaling."""
    C, C_out = x.shape[1], weight.shape[0]
    stats = out if out is not None else GramStats(C, device=x.device)
    _check_out(stats, C)
    if x.device != stats.device:
        raise ValueError(f"x is on {x.device} but out lives on {stats.device}")
    cdt = stats.compute_dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    m = min(S, stats.chunk)
    if any(_scale.rescale_exponent(_amax(t), cdt, n) for t, n in ((x, m), (weight, C_out), (Y, m)) if t is not None):
        return None, None
    if cdt == torch.float32:
        stats.precision = torch.float32
    return stats, cdt


def _finish(stats, WX, Wk, xsum, YtX, Y, S) -> GramStats:
    """Add a layer's statistics into `stats` from WX = sum over offset pairs of (W^T W) * (X^T X)
    (C x C, float64), the weight Wk (C_out, C, K), the patch sums xsum (C, K), Y^T X (C_out, C, K;
    None for the dense output) and the target Y (or None), S output positions."""
    C_out, C, _ = Wk.shape
    N = float(C)
    G = (N * N) * WX
    W64 = Wk.double()
    u_sum = N * (W64.sum(0) * xsum).sum(1)
    if YtX is None:  # y = mean_j u_j: b = G 1 / N, ||y||^2 = 1^T G 1 / N^2, sum y = sum_j u_sum_j / N
        b = G.sum(1) / N
        yty, ysum = float(G.sum()) / (N * N), float(u_sum.sum()) / N
    else:
        b = N * (YtX * W64).sum((0, 2))
        yty = ysum = 0.0
        rows = max(1, stats.chunk // max(1, Y[0].numel()))
        for i in range(0, Y.shape[0], rows):  # in float64, a few images at a time
            y64 = Y[i : i + rows].double().reshape(-1)
            yty, ysum = yty + float(torch.dot(y64, y64)), ysum + float(y64.sum())
    return _accumulate(stats, G, b, u_sum, yty, ysum, S * C_out)

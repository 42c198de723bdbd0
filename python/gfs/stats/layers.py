"""Layer statistics: GramStats of a Linear or Conv2d layer's input channels as candidates,
without forming the N x M contributions (docs/design.md section 2)."""

from __future__ import annotations

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
    G = (G + G.T) * 0.5
    stats.G.add_(G)
    stats.b += b
    stats.u_sum += u_sum
    stats.yy += yty
    stats.y_sum += ysum
    stats.count += S * C_out
    return stats


def _amax(t: torch.Tensor) -> float:
    """max |t| in one reduction (no temporary)."""
    lo, hi = torch.aminmax(t.reshape(-1))
    return max(-float(lo), float(hi))

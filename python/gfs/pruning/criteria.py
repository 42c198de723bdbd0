"""Which channels of a group to keep: one class per criterion, one small interface.

Every criterion returns a :class:`Decision`: the kept channels and one scale per kept channel.
The pruned consumer then computes ``consumer(X * s)`` with ``s_j = scale_j`` on kept channels and
0 elsewhere (see :mod:`gfs.pruning.fold`).

- ``"local"`` (local imitation, Ye, Wu, Liu, NeurIPS 2020). For a consumer with weight W and
  input channels X_j, candidate j is the consumer's output from channel j alone, scaled by N:
  ``u_j = N * consumer(X_j only)`` (no bias), so the dense output is the uniform average
  ``mean_j u_j``. The target is the *original* network's consumer output (minus bias) on the same
  batch. gfs.select picks the subnetwork ``sum_j w_j u_j``; the scales are ``N * w_j``.
  The problem goes to gfs.select as the Gram engine's layer statistics
  (:func:`gfs.stats.layer_stats`: G = U U^T, b = U y from the consumer's input patches, no
  N x M tensor), exact on every output. Consumers layer_stats cannot take (a Conv2d with
  padding_mode other than "zeros", or string padding) fall back to :func:`group_statistics`, the
  materialised candidate matrix, which subsamples output positions beyond MAX_ELEMENTS (the
  report's ``sampled`` then says which fraction was used). With ``imitate="normalized"`` a
  consumer followed by a BatchNorm imitates that BatchNorm's output (:func:`weigh_outputs`: its
  output channel o weighted by gamma_o / sigma_o), with ``"recalibrated"`` also with each output
  channel's mean over the positions free (:func:`output_sums`, ``GramStats.centred``).
- ``"loss"`` (the ICML 2020 procedure, Ye, Gong, Nie, Zhu, Liu, Liu: "Good subnetworks provably
  exist"): greedy forward selection on the *whole network's* loss. Channels are added one at a
  time; at step t (t channels chosen) every candidate j not chosen yet (or ``loss_candidates``
  of them drawn at random) is scored by the network's loss on the calibration batches with the
  consumer's input channels scaled by ``s = N * counts / (t + 1)``: ``N / (t + 1)`` on the chosen
  channels and j, 0 elsewhere. That is the papers' parameterisation, the subnetwork as the
  uniform average over the chosen channels, exactly the scales "local" uses with the uniform
  step. The loss is cross-entropy against the labels when the calibration batches are ``(x, y)``
  with integer y, else the mean squared error to the original network's outputs
  (:mod:`gfs.pruning.loss`). Options: a first-order shortlist (``shortlist=T``: the gradient of
  the loss w.r.t. s at the current subnetwork predicts each candidate's loss change,
  ``dL ~ g_j N / (t + 1)`` plus a term common to all; only the T best predicted are evaluated),
  and a top-1 tolerance stop (``tolerance``: stop once the pruned network's top-1 on the
  calibration data is >= (1 - tolerance) times the original network's). Ties go to the lowest
  index.
- ``"l1"``: the ``keep`` producer filters with the largest L1 norm (Li et al., 2017); kept
  channels keep their weights (scale 1).
- ``"random"``: a uniformly random subset (seeded); scale 1.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engines import line_search
from ..engines.plan import gram_runs
from ..select import select
from ..selection import Selection
from ..stats import GramStats, conv2d_stats, linear_stats

# Largest candidate matrix materialised (elements, float32): 2^26 = 256 MiB. Beyond it, output
# positions are subsampled uniformly at random (seeded), and the report says so ("sampled").
MAX_ELEMENTS = 1 << 26


@dataclass
class Decision:
    """Kept channels (sorted LongTensor) and their scales (float64, same length)."""

    keep: torch.Tensor
    scale: torch.Tensor
    selection: Selection | None = None
    sampled: float = 1.0  # fraction of the output coordinates the criterion looked at
    # the Gram statistics the decision was made on ("local"), from which the report's losses come
    stats: GramStats | None = None
    timings: dict = dataclasses.field(default_factory=dict)  # seconds: "statistics", "select"


# ---- the consumer, channel by channel --------------------------------------------------------


def _channel_view(layer, t):
    """Reshape a per-channel vector to broadcast over the consumer's input/output layout."""
    return t.view(1, -1, 1, 1) if isinstance(layer, nn.Conv2d) else t


def consumer_output(X: torch.Tensor, layer: nn.Module, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The consumer's output without bias on X, input channel j multiplied by scale[j]."""
    W = layer.weight
    if scale is not None:
        X = X * _channel_view(layer, scale.to(X.dtype)) if isinstance(layer, nn.Conv2d) else X * scale.to(X.dtype)
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(X, W.to(X.dtype), None)
    return F.linear(X, W.to(X.dtype))


def remove_bias(output: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    if layer.bias is None:
        return output
    return output - _channel_view(layer, layer.bias.to(output.dtype))


def _candidates(X, layer, channels, dtype):
    """(len(channels), M): channel j's share of the consumer output (unscaled), M in output order."""
    W = layer.weight.to(dtype)
    idx = torch.as_tensor(channels, device=X.device)
    if isinstance(layer, nn.Linear):
        X2 = X.reshape(-1, X.shape[-1]).to(dtype)[:, idx]  # (P, n)
        Wc = W[:, idx]  # (Cout, n)
        return (X2.t()[:, :, None] * Wc.t()[:, None, :]).reshape(len(idx), -1)
    n = len(idx)
    Xc = X[:, idx].to(dtype)
    if layer.padding_mode != "zeros":
        Xc = F.pad(Xc, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = 0
    else:
        padding = layer.padding
    Cout = W.shape[0]
    Wg = W[:, idx].transpose(0, 1).reshape(n * Cout, 1, *W.shape[2:])
    out = F.conv2d(Xc, Wg, None, layer.stride, padding, layer.dilation, groups=n)  # (B, n*Cout, H, W)
    B = out.shape[0]
    return out.view(B, n, Cout, *out.shape[2:]).transpose(0, 1).reshape(n, -1)


def _positions(X, layer):
    """Output positions of the consumer: (B, Ho, Wo) for Conv2d, (rows,) for Linear."""
    if isinstance(layer, nn.Linear):
        return (X.reshape(-1, X.shape[-1]).shape[0],)
    B = X.shape[0]
    pads = layer._reversed_padding_repeated_twice
    Hp, Wp = X.shape[2] + pads[2] + pads[3], X.shape[3] + pads[0] + pads[1]
    kh, kw = layer.kernel_size
    (sh, sw), (dh, dw) = layer.stride, layer.dilation
    return B, (Hp - dh * (kh - 1) - 1) // sh + 1, (Wp - dw * (kw - 1) - 1) // sw + 1


def _candidates_at(X, layer, positions, dtype):
    """(N, len(positions) * Cout): every channel's share of the consumer output at the flat
    output positions ``positions`` (all output channels of each; unscaled), one gather and one
    broadcast multiply-add per kernel tap: the full per-channel outputs are never formed."""
    W = layer.weight.to(dtype)
    Cout, N = W.shape[:2]
    if isinstance(layer, nn.Linear):
        Xg = X.reshape(-1, N)[positions].to(dtype)  # (m, N)
        return (Xg.t()[:, :, None] * W.t()[:, None, :]).reshape(N, -1)
    _, Ho, Wo = _positions(X, layer)
    b, rest = positions // (Ho * Wo), positions % (Ho * Wo)
    h, w = rest // Wo, rest % Wo
    Xp = F.pad(
        X,
        layer._reversed_padding_repeated_twice,
        mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode,
    )
    Xcl = Xp.permute(0, 2, 3, 1).contiguous()  # channels last: each gathered row is contiguous
    (sh, sw), (dh, dw) = layer.stride, layer.dilation
    kh, kw = W.shape[2:]
    taps = [Xcl[b, h * sh + i * dh, w * sw + j * dw] for i in range(kh) for j in range(kw)]  # each (m, N)
    patches = torch.stack(taps, -1).to(dtype).permute(1, 0, 2)  # (N, m, taps)
    Wt = W.reshape(Cout, N, kh * kw).permute(1, 2, 0)  # (N, taps, Cout)
    return torch.bmm(patches, Wt).reshape(N, -1)  # (N, m * Cout): channel j's patches times its filters


def _targets_at(target, layer, positions):
    if isinstance(layer, nn.Linear):
        return target.reshape(-1, target.shape[-1])[positions].reshape(-1)
    B, Cout, Ho, Wo = target.shape
    b, rest = positions // (Ho * Wo), positions % (Ho * Wo)
    return target[b, :, rest // Wo, rest % Wo].reshape(-1)  # (m, Cout), like the candidates


def group_statistics(
    X: torch.Tensor,
    layer: nn.Module,
    target: torch.Tensor,
    *,
    max_elements: int | None = None,
    generator: torch.Generator | None = None,
):
    """What gfs.select needs for one group's local imitation problem: ``(features, targets)``.

    Parameters
    ----------
    X : Tensor
        The consumer's input over the calibration batches ((B, N, H, W) for Conv2d, (..., N) for
        Linear), taken from the network pruned so far.
    layer : nn.Conv2d or nn.Linear
        The consumer (its weight W and geometry; its bias is not part of the candidates).
    target : Tensor
        The original network's consumer output minus bias, same shape as ``layer(X)``.

    Returns
    -------
    features : Tensor (N, M)
        Row j is u_j = N * (consumer output of channel j alone), flattened like the target, so
        that the dense output is ``features.mean(0)``.
    targets : Tensor (M,)

    When N x M exceeds ``max_elements`` (default MAX_ELEMENTS), only ``max_elements // (N * Cout)`` output positions
    (an image and a pixel, or a row for Linear), drawn uniformly without replacement with
    ``generator``, are used, with all output channels of each: M is then smaller than
    ``target.numel()`` (ordered position-major), and only those outputs are computed.
    """
    max_elements = MAX_ELEMENTS if max_elements is None else max_elements
    dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    N = X.shape[1] if isinstance(layer, nn.Conv2d) else X.shape[-1]
    Cout = layer.weight.shape[0]
    M = target.numel()
    if N * M > max_elements:
        total = math.prod(_positions(X, layer))
        positions = sample_positions(total, max(1, max_elements // (N * Cout)), generator).to(X.device)
        U = _candidates_at(X, layer, positions, dtype)
        y = _targets_at(target, layer, positions).to(dtype)
    else:
        U = _candidates(X, layer, range(N), dtype)
        y = target.reshape(-1).to(dtype)
    U.mul_(N)
    return U, y


def sample_positions(total: int, m: int, generator=None) -> torch.Tensor:
    """m of ``total`` output positions, uniformly without replacement, sorted."""
    return torch.randperm(total, generator=generator)[:m].sort().values


def gram_unsupported(layer: nn.Module) -> str | None:
    """Why the Gram layer statistics cannot take this consumer, or None when they can."""
    if isinstance(layer, nn.Linear):
        return None
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return f"groups={layer.groups}"
        if not isinstance(layer.padding, tuple):
            return f"padding={layer.padding!r}"
        if layer.padding_mode != "zeros":
            return f"padding_mode={layer.padding_mode!r}"
        return None
    return f"{type(layer).__name__} is not a Linear or Conv2d"


def gram_statistics(X: torch.Tensor, layer: nn.Module, target: torch.Tensor) -> GramStats:
    """The local imitation problem of one group as GramStats (G = U U^T, b = U y, ||y||^2, M),
    the same problem as :func:`group_statistics` (u_j = N * channel j's share of the consumer
    output, no bias; y = ``target``, the original consumer output *minus* bias) on every output,
    built from the consumer's input by gfs.stats.linear_stats / conv2d_stats without forming the
    N x M candidate matrix. Float32 inputs are multiplied in float32 and summed in float64.

    A Conv2d goes through conv2d_stats with method="auto" (its cost rule picks the "offsets"
    identity, the "shifts" products or chunked materialisation; each is exact)."""
    why = gram_unsupported(layer)
    if why is not None:
        raise ValueError(f"the Gram layer statistics cannot take this consumer ({why}); use group_statistics")
    W = layer.weight.detach().to(X.dtype)
    target = target.to(X.dtype)
    if isinstance(layer, nn.Linear):
        return linear_stats(X, W, target, None)  # target is already bias-free: bias=None
    return conv2d_stats(X, W, target, None, stride=layer.stride, padding=layer.padding, dilation=layer.dilation)


def weigh_outputs(layer: nn.Module, target: torch.Tensor, out_scale: torch.Tensor):
    """``(consumer, target)`` with output channel o of both multiplied by ``out_scale[o]``: a
    stand-in for the consumer (a shallow copy whose weight rows are scaled and bias dropped; the
    layer itself is untouched), so that the local problem imitates the weighted output."""
    c = out_scale.detach().to(device=layer.weight.device, dtype=layer.weight.dtype)
    if c.shape != (layer.weight.shape[0],):
        raise ValueError(
            f"out_scale has shape {tuple(c.shape)}, expected ({layer.weight.shape[0]},): one per output channel"
        )
    weighted = copy.copy(layer)
    weighted._parameters = dict(layer._parameters)  # its own table: the layer's weight stays
    weighted._parameters["weight"] = nn.Parameter(
        layer.weight.detach() * c.view(-1, *[1] * (layer.weight.dim() - 1)), requires_grad=False
    )
    weighted._parameters["bias"] = None
    return weighted, target * _output_view(layer, target, c.to(target.dtype))


def _output_view(layer, target, c):
    """A per-output-channel vector shaped to broadcast over the consumer's output ``target``."""
    return c.view(1, -1, *[1] * (target.dim() - 2)) if isinstance(layer, nn.Conv2d) else c


def local_problem(X, layer, target, *, method="auto", generator=None, max_elements=None, out_scale=None, centre=False):
    """``(features, targets, sampled)`` for gfs.select: GramStats and None (``method="gram"``),
    or the materialised ``(U, y)`` (``"materialise"``; subsampled beyond ``max_elements``).
    ``"auto"``: the Gram statistics when the consumer allows them (exact), else materialised.
    ``out_scale`` (one per output channel): imitate the output with channel o weighted by
    ``out_scale[o]`` (:func:`weigh_outputs`); ``centre``: with each output channel's mean over
    the positions removed from the candidates and the target (:func:`output_sums`)."""
    if method not in ("auto", "gram", "materialise"):
        raise ValueError(f"unknown method {method!r}; choose 'auto', 'gram' or 'materialise'")
    if out_scale is not None:
        layer, target = weigh_outputs(layer, target, out_scale)
    if centre:
        return _centred_problem(X, layer, target, method=method, generator=generator, max_elements=max_elements)
    if method == "gram" or (method == "auto" and gram_unsupported(layer) is None):
        return gram_statistics(X, layer, target), None, 1.0
    U, y = group_statistics(X, layer, target, max_elements=max_elements, generator=generator)
    return U, y, y.numel() / target.numel()


def output_sums(X: torch.Tensor, layer: nn.Module, target: torch.Tensor):
    """``(S, t, P)``: S (N, Cout) float64, the sum over every output position of u_j's output
    channel o (u_j = N * channel j's share of the consumer output, no bias); t (Cout,) the sum of
    the target's channel o; P the number of positions.

    For a Conv2d, S[j, o] = N sum_ab W[o, j, a, b] R[j, a, b], where R[j, a, b] is the sum of input
    channel j (zero-padded, summed over the batch) over the positions kernel offset (a, b) reads:
    the correlation of that sum with a block of ones, one small product per channel."""
    N = X.shape[1] if isinstance(layer, nn.Conv2d) else X.shape[-1]
    W = layer.weight.detach().double()
    if isinstance(layer, nn.Conv2d):
        (kh, kw), (dh, dw) = W.shape[2:], layer.dilation
        Ho, Wo = target.shape[2:]
        ones = torch.ones(1, 1, Ho, Wo, dtype=torch.float64, device=X.device)
        R = F.conv2d(X.double().sum(0).unsqueeze(1), ones, padding=layer.padding, dilation=layer.stride)
        R = R[:, 0, : dh * (kh - 1) + 1 : dh, : dw * (kw - 1) + 1 : dw]  # (N, kh, kw)
        S = torch.einsum("ojab,jab->jo", W, R)
        t = target.double().sum((0, 2, 3))
        P = target.shape[0] * Ho * Wo
    else:
        S = X.double().reshape(-1, N).sum(0)[:, None] * W.T
        t = target.double().reshape(-1, target.shape[-1]).sum(0)
        P = target.numel() // target.shape[-1]
    return S * N, t, P


def _centred_problem(X, layer, target, *, method, generator, max_elements):
    """The local problem with every output channel's mean over the positions removed from the
    candidates and the target: the error left once a constant per output channel is free.

    The Gram statistics are built in float64 (G - S S^T / P cancels: a candidate that is nearly
    constant over the positions, e.g. a saturated channel into a 1x1 consumer, leaves only
    rounding of float32 products)."""
    if method == "gram" or (method == "auto" and gram_unsupported(layer) is None):
        X, target = X.double(), target.double()
        S, t, P = output_sums(X, layer, target)
        return gram_statistics(X, layer, target).centred(S, t, P), None, 1.0
    U, y = group_statistics(X, layer, target, max_elements=max_elements, generator=generator)
    Cout = layer.weight.shape[0]
    if isinstance(layer, nn.Conv2d) and y.numel() == target.numel():  # every output, in (B, Cout, H, W) order
        shape, dims = (target.shape[0], Cout, -1), (0, 2)
    else:  # Linear rows, or sampled positions: (positions, Cout)
        shape, dims = (-1, Cout), (0,)
    U = U.view(U.shape[0], *shape)
    U = (U - U.mean([d + 1 for d in dims], keepdim=True)).reshape(U.shape[0], -1)
    y = y.view(*shape)
    y = (y - y.mean(dims, keepdim=True)).reshape(-1)
    return U, y, y.numel() / target.numel()


# ---- criteria --------------------------------------------------------------------------------


@dataclass
class Context:
    """What a criterion may look at for one group."""

    group: object  # ChannelGroup
    X: torch.Tensor  # consumer input, network pruned so far
    layer: nn.Module  # the consumer (current)
    target: torch.Tensor  # original consumer output minus bias
    producer: nn.Module
    keep: int
    step: str = "uniform"
    replacement: bool = False
    eps: float | None = None
    backend: str = "auto"
    generator: torch.Generator | None = None
    # criterion "loss": the whole network's loss as a function of the consumer's input scales
    # (a gfs.pruning.loss.ConsumerTail), and its options
    network: object = None
    loss_candidates: int | None = None
    shortlist: int | None = None
    tolerance: float | None = None
    on_step: object = None  # called after each greedy step ("loss"): progress
    # data-parallel calibration ("local"): the problem built from this rank's batches in, the
    # problem of all ranks' batches out (gfs.pruning.parallel: the GramStats summed over the ranks)
    reduce: object = None
    # "local" with imitate="normalized": one weight per consumer output channel (the following
    # BatchNorm's gamma / sqrt(running_var + eps)); the error imitated is that of the weighted output
    out_scale: torch.Tensor | None = None
    centre: bool = False  # imitate="recalibrated": and each output channel's mean is free


class Criterion:
    name = ""
    needs_data = True
    needs_network = False  # True: the Context carries ``network`` (the whole network's loss)

    def decide(self, ctx: Context) -> Decision:  # pragma: no cover - interface
        raise NotImplementedError


class LocalImitation(Criterion):
    """Greedy forward selection on the consumer's output (local imitation)."""

    name = "local"

    method = "auto"  # see local_problem

    def decide(self, ctx):
        method = self.method
        if method == "auto" and not gram_runs(ctx.X.device, ctx.step, ctx.backend):
            method = "materialise"  # a streaming-only backend was asked for: it needs the features
        t0 = time.perf_counter()
        features, y, sampled = local_problem(
            ctx.X,
            ctx.layer,
            ctx.target,
            method=method,
            generator=ctx.generator,
            out_scale=ctx.out_scale,
            centre=ctx.out_scale is not None and ctx.centre,
        )
        if ctx.reduce is not None:
            features = ctx.reduce(features)
        t1 = time.perf_counter()
        N = ctx.group.channels
        sel = select_channels(
            features, y, ctx.keep, step=ctx.step, replacement=ctx.replacement, eps=ctx.eps, backend=ctx.backend
        )
        keep = sel.support.clone()
        scale = N * sel.weights[keep]
        stats = features if isinstance(features, GramStats) else None
        timings = {"statistics": t1 - t0, "select": time.perf_counter() - t1}
        return Decision(keep=keep, scale=scale, selection=sel, sampled=sampled, stats=stats, timings=timings)


class WholeNetworkLoss(Criterion):
    """Greedy forward selection on the whole network's calibration loss (see the module notes)."""

    name = "loss"
    needs_network = True

    def decide(self, ctx):
        t0 = time.perf_counter()
        net, N, gen = ctx.network, ctx.group.channels, ctx.generator
        chosen, remaining = [], list(range(N))
        losses, top1, evaluated = [], [], 0
        dense_loss, dense_top1 = (float(v[0]) for v in net.evaluate(torch.ones(1, N, dtype=torch.float64)))
        for t in range(ctx.keep):
            cand = remaining
            if ctx.loss_candidates is not None and len(cand) > ctx.loss_candidates:
                pick = torch.randperm(len(cand), generator=gen)[: ctx.loss_candidates].sort().values
                cand = [cand[i] for i in pick.tolist()]
            if ctx.shortlist is not None and len(cand) > ctx.shortlist:
                current = torch.zeros(N, dtype=torch.float64)
                if chosen:
                    current[chosen] = N / len(chosen)
                g = net.gradient(current)  # predicted change of adding j: g_j N / (t + 1) + common
                cand = sorted(sorted(cand, key=lambda j: (float(g[j]), j))[: ctx.shortlist])
            S = torch.zeros(len(cand), N, dtype=torch.float64)
            if chosen:
                S[:, chosen] = N / (t + 1)
            S[torch.arange(len(cand)), torch.tensor(cand)] = N / (t + 1)
            loss, hits = net.evaluate(S)
            evaluated += len(cand)
            best = int(torch.argmin(loss))  # first minimum: ties to the lowest index (cand is sorted)
            chosen.append(cand[best])
            remaining.remove(cand[best])
            losses.append(float(loss[best]))
            top1.append(float(hits[best]))
            if ctx.on_step is not None:
                ctx.on_step()
            if ctx.tolerance is not None and top1[-1] >= (1 - ctx.tolerance) * net.original_top1:
                break
        keep = torch.tensor(sorted(chosen), dtype=torch.long)
        k = len(chosen)
        idx = torch.tensor(chosen, dtype=torch.long)
        sel = Selection(
            indices=idx,
            support=keep.clone(),
            weights=torch.bincount(idx, minlength=N).double() / k,
            losses=torch.tensor(losses, dtype=torch.float64),
            gaps=torch.full((k,), float("nan"), dtype=torch.float64),
            dense_loss=dense_loss,
            backend="torch",
            engine="network",
            step="uniform",
            replacement=False,
            reason=f"whole-network {net.kind} loss on the calibration batches; {evaluated} candidates evaluated",
            seconds=time.perf_counter() - t0,
            notes={
                "top1": torch.tensor(top1, dtype=torch.float64),
                "dense_top1": dense_top1,
                "original_top1": net.original_top1,
                "kind": net.kind,
                "evaluated": evaluated,
            },
        )
        return Decision(keep=keep, scale=torch.full((k,), N / k, dtype=torch.float64), selection=sel)


class L1Norm(Criterion):
    """The producer filters with the largest L1 norm; ties to the lowest index."""

    name = "l1"
    needs_data = False

    def decide(self, ctx):
        W = ctx.producer.weight.detach()
        norms = W.reshape(W.shape[0], -1).abs().sum(1).double().cpu()
        order = sorted(range(len(norms)), key=lambda j: (-float(norms[j]), j))
        keep = torch.tensor(sorted(order[: ctx.keep]), dtype=torch.long)
        return Decision(keep=keep, scale=torch.ones(len(keep), dtype=torch.float64))


class RandomSubset(Criterion):
    """A uniformly random subset of the channels (seeded through ``seed=``)."""

    name = "random"
    needs_data = False

    def decide(self, ctx):
        N = ctx.group.channels
        keep = torch.randperm(N, generator=ctx.generator)[: ctx.keep].sort().values
        return Decision(keep=keep, scale=torch.ones(len(keep), dtype=torch.float64))


CRITERIA = {c.name: c for c in (LocalImitation, WholeNetworkLoss, L1Norm, RandomSubset)}


def select_channels(U, y, keep: int, *, step="uniform", replacement=False, eps=None, backend="auto") -> Selection:
    """gfs.select until ``keep`` distinct channels are chosen (U, y: features and targets, or
    GramStats and None).

    Without replacement that is ``keep`` steps. With replacement a channel may be picked again
    (its weight grows), so the greedy sequence is run longer (doubling, at most 8 x keep steps)
    and cut at the first step where it has ``keep`` distinct channels; the greedy rule is
    deterministic, so that prefix is exactly what a run of that many steps returns, weights
    included (see :func:`_prefix_with_distinct`). With ``eps`` the selection may stop earlier,
    with fewer channels.
    """
    if not replacement:
        return select(U, y, keep, replacement=False, step=step, eps=eps, backend=backend)
    steps, cap = keep, 8 * keep
    while True:
        sel = select(U, y, steps, replacement=True, step=step, eps=eps, backend=backend)
        if sel.support.numel() >= keep or sel.k < steps or steps >= cap:
            break
        steps = min(cap, 2 * steps)
    return _prefix_with_distinct(sel, keep, U, y, eps=eps)


def _prefix_with_distinct(sel: Selection, keep: int, U, y=None, *, eps=None) -> Selection:
    """The first steps of ``sel`` up to the one where ``keep`` distinct candidates are chosen,
    with the weights a run of that many steps returns (``sel`` itself when that is all of it):

    - "uniform": counts / t;
    - "line_search": the recurrence w <- (1 - gamma) w + gamma e_j over the first t steps (the
      step sizes are in ``sel.notes["gammas"]``), as the engines compute it;
    - "refit": the affine least-squares refit of the set chosen in those steps, which needs the
      problem: gfs.select runs again for t steps on (U, y) with the engine and backend that ran
      ``sel`` (the greedy rule is deterministic, so its picks are the prefix).
    """
    seen, t = set(), sel.k
    for i, j in enumerate(sel.indices.tolist()):
        seen.add(j)
        if len(seen) == keep:
            t = i + 1
            break
    if t == sel.k:
        return sel
    n = U.n if isinstance(U, GramStats) else U.shape[0]
    idx = sel.indices[:t]
    gammas = sel.notes["gammas"][:t]
    if sel.step == "uniform":
        weights = torch.bincount(idx, minlength=n).double() / t
    elif sel.step == "line_search":
        weights = line_search.weights(idx.tolist(), gammas.tolist(), n, sel.weights.device)
    elif sel.step == "refit":
        again = select(U, y, t, replacement=True, step="refit", eps=eps, backend=sel.backend, engine=sel.engine)
        if not torch.equal(again.indices, idx):  # pragma: no cover - the greedy rule is deterministic
            raise RuntimeError(
                f"refit: a run of {t} steps picked {again.indices.tolist()}, not the prefix "
                f"{idx.tolist()} of the longer run; please report this"
            )
        weights = again.weights
    else:
        raise ValueError(f"unknown step {sel.step!r}")
    notes = dict(sel.notes)
    notes["gammas"] = gammas
    notes["prefix"] = f"the first {t} of {sel.k} greedy steps (the first with {keep} distinct candidates)"
    return dataclasses.replace(
        sel,
        indices=idx,
        support=torch.unique(idx),
        weights=weights,
        losses=sel.losses[:t],
        gaps=sel.gaps[:t],
        notes=notes,
    )


def keep_count(n: int, keep, ratio) -> int:
    """Channels to keep of n: ``keep`` as given, or ``ratio * n`` rounded half up, at least 1."""
    if keep is not None:
        return int(keep)
    return max(1, min(n, math.floor(ratio * n + 0.5)))

"""Consumers: the layers whose input channels are gfs's candidates, seen one way.

A *consumer* mixes its input channels into every output: nn.Linear, nn.Conv2d (dense, or grouped
but not depthwise) and nn.MultiheadAttention (its input projection ``in_proj_weight``, applied to
the query, which must be the key and the value too: self-attention). For each the helpers here
give the weight, the bias, the input of a call, the bias-free output, the Gram layer statistics
of the input channels (gfs.stats.linear_stats / conv2d_stats: u_p = C_in * (channel p's share of
the output), no N x M tensor is formed) and the compensation: input channel p's column scaled by
s_p (docs/design.md section 2; as gfs.pruning.fold does for gfs.prune).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..stats import GramStats, conv2d_stats, linear_stats


def _is_depthwise(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def kind(m: nn.Module) -> str | None:
    """The consumer kind of ``m``: "linear", "conv" or "mha"; None if it is not one."""
    if isinstance(m, nn.Linear):
        return "linear"
    if type(m) is nn.Conv2d and not _is_depthwise(m):
        return "conv"
    if isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim and m.in_proj_weight is not None:
        return "mha"
    return None


def why_not(m: nn.Module) -> str:
    """Why ``m`` cannot be a consumer (for messages)."""
    if isinstance(m, nn.MultiheadAttention):
        return "nn.MultiheadAttention with separate q/k/v projections (kdim or vdim != embed_dim)"
    if isinstance(m, nn.modules.conv._ConvNd):
        return f"{type(m).__name__} (gfs takes nn.Linear, nn.Conv2d and nn.MultiheadAttention as consumers)"
    return f"{type(m).__name__} mixes channels in a way gfs does not model"


def weight(m: nn.Module) -> torch.Tensor:
    w = m.in_proj_weight if isinstance(m, nn.MultiheadAttention) else m.weight
    assert isinstance(w, torch.Tensor)
    return w


def bias(m: nn.Module) -> torch.Tensor | None:
    b = m.in_proj_bias if isinstance(m, nn.MultiheadAttention) else m.bias
    return b if isinstance(b, torch.Tensor) else None


def in_channels(m: nn.Module) -> int:
    return int(weight(m).shape[1]) * (m.groups if isinstance(m, nn.Conv2d) else 1)


def channel_dim(m: nn.Module) -> int:
    """The input's channel dimension: 1 for Conv2d, the last for Linear / attention."""
    return 1 if type(m) is nn.Conv2d else -1


def input_of(m: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The consumer's input tensor in a call ``m(*args, **kwargs)``."""
    if isinstance(m, nn.MultiheadAttention):
        names = ("query", "key", "value")
        q, k, v = (args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names))
        if not (k is q and v is q) or not isinstance(q, torch.Tensor):
            raise NotSelfAttention()
        return q
    return args[0] if args else next(iter(kwargs.values()))


class NotSelfAttention(ValueError):
    def __init__(self):
        super().__init__(
            "nn.MultiheadAttention is called with a key or value other than its query: gfs models the input "
            "projection of self-attention only"
        )


def _view(m: nn.Module, v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1) if type(m) is nn.Conv2d else v


def output(m: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The consumer's bias-free output on x (for attention: the input projection), input channel p
    multiplied by mask[p] when a mask is given."""
    W = weight(m).detach().to(x.dtype)
    if mask is not None:
        x = x * _view(m, mask.to(device=x.device, dtype=x.dtype))
    if type(m) is nn.Conv2d:
        return m._conv_forward(x, W, None)
    return F.linear(x, W)


def remove_bias(m: nn.Module, out: torch.Tensor) -> torch.Tensor:
    b = bias(m)
    return out if b is None else out - _view(m, b.detach().to(out.dtype))


def target_of(m: nn.Module, x: torch.Tensor, out) -> torch.Tensor:
    """The bias-free output of a call (attention: the input projection of its input x)."""
    if isinstance(m, nn.MultiheadAttention):
        return output(m, x)
    return remove_bias(m, out)


def _padded(m: nn.Conv2d, x: torch.Tensor):
    """(x, padding) for gfs.stats.conv2d_stats: string padding or a padding mode other than zeros
    are applied to x here (padding 0 then)."""
    if isinstance(m.padding, tuple) and m.padding_mode == "zeros":
        return x, m.padding
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    return F.pad(x, m._reversed_padding_repeated_twice, mode=mode), (0, 0)


BUFFER_BYTES = 256 << 20  # inputs (and targets) of one consumer gathered before its statistics are updated


class Accumulator:
    """Gram layer statistics of one consumer's C_in input channels, summed over batches:
    G (C_in x C_in), b (C_in), yy and count, with u_p = C_in * (channel p's share of the output)
    and y the given bias-free target (or the dense output).

    Batches are gathered up to BUFFER_BYTES and their statistics computed in one call (the
    layer statistics cost O(C_in^2 C_out) per call for the weights' Gram, whatever the batch)."""

    def __init__(self, m: nn.Module, device):
        self.m, self.C = m, in_channels(m)
        self.gram = GramStats(self.C, device=device)
        self.extra: list | None = None  # grouped convolutions: [G, b, yy, count] added block by block
        self.xs: list = []
        self.ys: list = []
        self.bytes = 0

    def add(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        self.xs.append(x)
        self.ys.append(y)
        self.bytes += x.numel() * x.element_size() + (0 if y is None else y.numel() * y.element_size())
        if self.bytes >= BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.xs:
            return
        dim = 0 if type(self.m) is nn.Conv2d else None
        if dim is None:  # Linear / attention: any leading shape, channels last
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in self.xs])
            ys = None if self.ys[0] is None else torch.cat([t.reshape(-1, t.shape[-1]) for t in self.ys])
        else:
            x = torch.cat(self.xs)
            ys = None if self.ys[0] is None else torch.cat(self.ys)
        self.xs, self.ys, self.bytes = [], [], 0
        self._update(x, ys)

    def _update(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        m, W = self.m, weight(self.m).detach()
        if type(m) is not nn.Conv2d:
            linear_stats(x, W.to(x.dtype), y, None, out=self.gram)
            return
        x, padding = _padded(m, x)
        conv = dict(stride=m.stride, padding=padding, dilation=m.dilation)
        if m.groups == 1:
            conv2d_stats(x, W.to(x.dtype), y, None, out=self.gram, **conv)
            return
        g, cpg, opg = m.groups, self.C // m.groups, W.shape[0] // m.groups
        if self.extra is None:
            dev = self.gram.device
            self.extra = [
                torch.zeros(self.C, self.C, dtype=torch.float64, device=dev),
                torch.zeros(self.C, dtype=torch.float64, device=dev),
                0.0,
                0,
            ]
        extra = self.extra
        G, b = extra[0], extra[1]
        for a in range(g):  # each group of input channels reaches its own outputs only: G is block diagonal
            ci, co = slice(a * cpg, (a + 1) * cpg), slice(a * opg, (a + 1) * opg)
            s = conv2d_stats(x[:, ci], W[co].to(x.dtype), None if y is None else y[:, co], None, **conv)
            G[ci, ci] += (g * g) * s.G  # u_p = C_in c_p = g * (cpg c_p)
            b[ci] += g * s.b
            extra[2] += s.yy
            extra[3] += s.count

    def result(self):
        """(G, b, yy, count) in float64."""
        self.flush()
        if self.extra is not None:
            return self.extra[0], self.extra[1], float(self.extra[2]), int(self.extra[3])
        s = self.gram
        return s.G, s.b, float(s.yy), int(s.count)


@torch.no_grad()
def scale_inputs(m: nn.Module, s: torch.Tensor) -> None:
    """Multiply input channel p's weights by s[p] (float64), in place: the consumer then computes
    its output from the inputs scaled by s (as gfs.pruning.fold does: W * s in float64, then cast)."""
    W = weight(m)
    s = s.to(device=W.device, dtype=torch.float64)
    if type(m) is nn.Conv2d and m.groups > 1:
        g, cpg, opg = m.groups, W.shape[1], W.shape[0] // m.groups
        S = s.view(g, 1, cpg).expand(g, opg, cpg).reshape(W.shape[0], cpg, 1, 1)
    elif type(m) is nn.Conv2d:
        S = s.view(1, -1, 1, 1)
    else:
        S = s.view(1, -1)
    W.copy_((W.double() * S).to(W.dtype))

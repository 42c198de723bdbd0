"""A ``torch.nn.utils.prune`` method: structured masks that keep the channels gfs selects.

    from torch.nn.utils import prune
    from gfs.integrations.nn_prune import gfs_structured

    h = features(x)                                  # calibration activations: conv's output, after BN/ReLU
    gfs_structured(conv, "weight", amount=0.5, activations=h, consumer=next_conv)
    prune.remove(conv, "weight")                     # make it permanent (the pruned filters are zeros)

The mask zeroes whole slices of the parameter along ``dim`` (0: a layer's output channels), like
``prune.ln_structured``, but the slices kept are gfs's selection (docs/design.md section 1),
computed from calibration activations of those channels:

- with ``consumer`` (the nn.Linear / nn.Conv2d that reads the channels, ``activations`` its
  input): local imitation, the channels whose weighted sum best reproduces the consumer's output,
  from gfs.stats.layer_stats (no N x M tensor), as gfs.prune's criterion "local";
- without: the channels' own activations are the candidates (channel dimension 1), and the target
  is their mean: the channels whose average best reproduces the average of all.

A mask cannot re-weight the kept channels in the consumer (gfs.prune and the Torch-Pruning
integration do): the selection is kept on the method (``method.selection``, a gfs.Selection;
``weights * N`` are the scales gfs would fold into the consumer's input channels). Like every
structured method of ``torch.nn.utils.prune`` it masks one parameter: a layer's bias still adds
its constant to a pruned channel unless it is masked too.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.nn.utils import prune

from .. import _validation as check
from ..select import select
from ..selection import Selection
from ..stats import GramStats
from . import _layers

__all__ = ["GFSStructured", "gfs_structured"]


def _batches(activations):
    if isinstance(activations, torch.Tensor):
        return [activations]
    if isinstance(activations, (str, bytes)) or not isinstance(activations, Iterable):
        raise TypeError(
            f"activations must be a tensor or an iterable of tensors (calibration batches), got "
            f"{type(activations).__name__}"
        )
    out = list(activations)
    if not out:
        raise ValueError("activations is empty: pass at least one batch of calibration activations")
    for i, a in enumerate(out):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"activations batch {i} is a {type(a).__name__}, not a tensor")
    return out


def _statistics(activations, consumer) -> GramStats:
    """GramStats over the channels of ``activations`` (see the module notes)."""
    batches = _batches(activations)
    if consumer is not None:
        if _layers.kind(consumer) not in ("linear", "conv"):
            raise TypeError(
                f"consumer must be an nn.Linear or nn.Conv2d (not depthwise), got {type(consumer).__name__}"
            )
        acc = None
        for i, a in enumerate(batches):
            a = a.detach()
            check.check_finite(a, f"activations batch {i}")
            C = a.shape[_layers.channel_dim(consumer)] if a.dim() > 1 else -1
            if C != _layers.in_channels(consumer):
                raise ValueError(
                    f"activations batch {i} has shape {tuple(a.shape)}, but the consumer reads "
                    f"{_layers.in_channels(consumer)} channels along dimension {_layers.channel_dim(consumer)}: pass "
                    f"the consumer's input"
                )
            if acc is None:
                acc = _layers.Accumulator(consumer, a.device)
            acc.add(a.to(_layers.weight(consumer).dtype), None)
        assert acc is not None
        G, b, yy, count = acc.result()
        stats = GramStats(G.shape[0], device=G.device)
        stats.G.copy_(G)
        stats.b.copy_(b)
        stats.yy, stats.count = yy, count
        stats.precision = acc.gram.precision
        return stats
    own: GramStats | None = None
    for i, a in enumerate(batches):
        if a.dim() < 2:
            raise ValueError(f"activations batch {i} has shape {tuple(a.shape)}: expected (batch, channels, ...)")
        U = a.detach().transpose(0, 1).reshape(a.shape[1], -1)  # (C, batch * positions)
        if own is None:
            own = GramStats(U.shape[0], device=U.device)
        elif U.shape[0] != own.n:
            raise ValueError(f"activations batch {i} has {U.shape[0]} channels, batch 0 has {own.n}")
        own.update(U, U.mean(0), _names=(f"activations batch {i}", f"the channel mean of batch {i}"))
    assert own is not None
    return own


def _amount(amount, n: int) -> int:
    """Channels to prune of n (torch.nn.utils.prune's convention: an int is a count, a float in
    [0, 1] a fraction, rounded)."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"amount must be an int (channels) or a float in [0, 1] (fraction), got {amount!r}")
    if isinstance(amount, numbers.Integral):
        if not 0 <= int(amount) <= n:
            raise ValueError(f"amount={amount} channels to prune, but the parameter has {n} along dim")
        return int(amount)
    if not 0.0 <= float(amount) <= 1.0:
        raise ValueError(f"amount must be in [0, 1] as a fraction, got {amount}")
    return round(float(amount) * n)


class GFSStructured(prune.BasePruningMethod):
    """Prune whole channels (slices along ``dim``) of a parameter, keeping those gfs selects.

    Parameters
    ----------
    amount : int or float
        Channels to prune: a count, or a fraction in [0, 1] (rounded), as in
        ``torch.nn.utils.prune``.
    activations : Tensor or iterable of Tensors
        Calibration activations of the channels: the consumer's input (with ``consumer``), or
        the channels themselves along dimension 1 (without). Several batches are summed.
    consumer : nn.Linear or nn.Conv2d, optional
        The layer that reads the channels (see the module notes).
    dim : int
        The parameter's channel dimension (0: output channels of Linear / Conv2d).
    step, backend
        gfs.select's (the selection is without replacement).

    After ``compute_mask``, ``selection`` holds the gfs.Selection.
    """

    PRUNING_TYPE = "structured"

    def __init__(self, amount, activations, consumer=None, dim: int = 0, step: str = "uniform", backend: str = "auto"):
        check.check_options(step, None, False)
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"dim must be an int, got {dim!r}")
        if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
            raise TypeError(f"amount must be an int (channels) or a float in [0, 1] (fraction), got {amount!r}")
        self.amount: numbers.Real = amount
        self.dim: int = int(dim)
        self.step: str = step
        self.backend: str = backend
        self._stats: GramStats | None = _statistics(activations, consumer)
        self.selection: Selection | None = None

    def compute_mask(self, t, default_mask):
        stats = self._stats
        if stats is None:
            raise RuntimeError("GFSStructured computes its mask once; apply a new method to prune again")
        C = t.shape[self.dim]
        if C != stats.n:
            raise ValueError(
                f"the parameter has {C} channels along dim={self.dim}, the activations {stats.n}: pass activations "
                f"of exactly these channels (after an earlier structured pruning of this parameter, of the "
                f"remaining ones)"
            )
        n_prune = _amount(self.amount, C)
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        if n_prune == 0:
            self._stats = None
            return mask
        keep = C - n_prune
        keep_mask = torch.zeros(C, dtype=mask.dtype, device=mask.device)
        if keep > 0:
            self.selection = select(stats, k=keep, replacement=False, step=self.step, backend=self.backend)
            keep_mask[self.selection.support.to(mask.device)] = 1
        shape = [1] * t.dim()
        shape[self.dim] = C
        self._stats = None  # the method stays on the module as a hook: keep nothing large
        return mask * keep_mask.view(shape)

    @classmethod
    def apply(  # type: ignore[override]  # (torch's is *args, **kwargs; these are the same, named)
        cls,
        module,
        name,
        amount,
        activations,
        consumer=None,
        dim=0,
        step="uniform",
        backend="auto",
        importance_scores=None,
    ):
        """Add the pruning reparametrisation to ``module.name`` (see torch.nn.utils.prune)."""
        return super().apply(
            module,
            name,
            amount=amount,
            activations=activations,
            consumer=consumer,
            dim=dim,
            step=step,
            backend=backend,
            importance_scores=importance_scores,
        )


def gfs_structured(
    module: nn.Module,
    name: str,
    amount,
    activations,
    consumer: nn.Module | None = None,
    dim: int = 0,
    *,
    step: str = "uniform",
    backend: str = "auto",
) -> nn.Module:
    """Prune channels of ``module.name`` along ``dim``, keeping gfs's selection (in the style of
    ``torch.nn.utils.prune.ln_structured``); ``prune.remove(module, name)`` makes it permanent.

    Returns the module.

    Examples
    --------
    >>> import torch
    >>> from torch.nn.utils import prune
    >>> conv, nxt = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1)
    >>> h = torch.relu(conv(torch.randn(16, 3, 10, 10)))
    >>> _ = gfs_structured(conv, "weight", amount=0.5, activations=h, consumer=nxt)
    >>> int((conv.weight.flatten(1).abs().sum(1) > 0).sum())
    4
    >>> _ = prune.remove(conv, "weight")
    """
    GFSStructured.apply(module, name, amount, activations, consumer, dim, step=step, backend=backend)
    return module

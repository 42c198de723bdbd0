"""Export: fold a group's decision into new, physically smaller modules.

For a group with kept channels ``keep`` (sorted) and scales ``s`` (one per kept channel):

- producer (Conv2d / Linear): output channels sliced: ``weight[keep]``, ``bias[keep]``;
- BatchNorm: ``weight``, ``bias``, ``running_mean``, ``running_var`` sliced;
- depthwise Conv2d: ``weight[keep]``, ``bias[keep]``, ``groups = len(keep)``;
- squeeze-excitation: fc1's input channels sliced, fc2's output channels sliced. The gate is then
  computed from the kept channels only; to keep it close to the dense gate, the dropped
  channels' mean pooled activation over the calibration batches is folded into fc1's bias
  (``b1 += W1[:, dropped] @ mean[dropped]``), which is exact when the calibration set is one
  sample and an approximation otherwise (``fold_error`` in the report measures it);
- consumer: input channels sliced and scaled: new column i is ``s_i * W[:, keep_i]``. For
  gfs ("local") ``s_i = N * w_keep_i``, so the new consumer computes exactly the selected
  subnetwork ``sum_j w_j u_j`` (plus its unchanged bias).

New modules are built (``torch.nn.utils.skip_init``, same dtype/device, same ``requires_grad``
and ``training`` flags) and set in place of the old ones in ``model`` — the caller passes a copy.
Hooks registered on a replaced module are not carried over.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import skip_init
from torch.utils.flop_counter import FlopCounterMode


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _param(new_tensor, old_param):
    return nn.Parameter(new_tensor.detach().clone(), requires_grad=old_param.requires_grad)


def conv_like(old: nn.Module, *, out_idx=None, in_idx=None, in_scale=None, bias_shift=None) -> nn.Module:
    """A new Conv2d / Linear with output rows ``out_idx`` and input columns ``in_idx`` (scaled)."""
    W = old.weight.detach()
    if out_idx is not None:
        W = W[out_idx.to(W.device)]
    if in_idx is not None:
        W = W[:, in_idx.to(W.device)]
    if in_scale is not None:
        s = in_scale.to(device=W.device, dtype=torch.float64)
        W = (W.double() * s.view(1, -1, *([1] * (W.dim() - 2)))).to(W.dtype)
    b = old.bias.detach() if old.bias is not None else None
    if b is not None and out_idx is not None:
        b = b[out_idx.to(b.device)]
    if bias_shift is not None:
        b = (b if b is not None else torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)) + bias_shift.to(W)
    kw = dict(device=W.device, dtype=W.dtype, bias=b is not None)
    if isinstance(old, nn.Linear):
        new = skip_init(nn.Linear, W.shape[1], W.shape[0], **kw)
    elif type(old) is nn.Conv2d:
        groups = old.groups
        if groups != 1:  # depthwise: one filter per channel, groups follow the channels
            groups = W.shape[0]
        new = skip_init(
            nn.Conv2d,
            W.shape[1] * groups,
            W.shape[0],
            old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            dilation=old.dilation,
            groups=groups,
            padding_mode=old.padding_mode,
            **kw,
        )
    else:  # pragma: no cover - groups.py only admits these
        raise TypeError(f"cannot rebuild {type(old).__name__}")
    new.weight = _param(W, old.weight)
    if b is not None:
        new.bias = _param(b, old.bias if old.bias is not None else old.weight)
    new.train(old.training)
    return new


def batchnorm_like(old: nn.Module, idx: torch.Tensor) -> nn.Module:
    ref = next((t for t in (old.weight, old.running_mean) if t is not None), None)
    dev, dtype = (ref.device, ref.dtype) if ref is not None else (None, None)
    idx = idx.to(dev) if dev is not None else idx
    new = type(old)(
        len(idx),
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        device=dev,
        dtype=dtype,
    )
    if old.affine:
        new.weight = _param(old.weight.detach()[idx], old.weight)
        new.bias = _param(old.bias.detach()[idx], old.bias)
    if old.track_running_stats and old.running_mean is not None:
        new.running_mean.copy_(old.running_mean[idx])
        new.running_var.copy_(old.running_var[idx])
        new.num_batches_tracked.copy_(old.num_batches_tracked)
    new.train(old.training)
    return new


@torch.no_grad()
def apply(model: nn.Module, group, keep: torch.Tensor, scale: torch.Tensor, se_means: dict | None = None) -> None:
    """Prune ``group`` in ``model`` (in place: pass a copy) to channels ``keep`` with ``scale``.

    ``se_means``: {fc1 name: mean over calibration of fc1's input (N,)} for the SE bias fold.
    """
    keep = keep.to(torch.long).cpu()
    N = group.channels
    dropped = torch.tensor(sorted(set(range(N)) - set(keep.tolist())), dtype=torch.long)
    get = model.get_submodule
    replace(model, group.producer, conv_like(get(group.producer), out_idx=keep))
    for m in group.members:
        if m.kind == "norm":
            replace(model, m.name, batchnorm_like(get(m.name), keep))
        elif m.kind == "depthwise":
            replace(model, m.name, conv_like(get(m.name), out_idx=keep))
        elif m.kind == "se":
            fc1 = get(m.name)
            shift = None
            if se_means is not None and m.name in se_means and len(dropped):
                W1 = fc1.weight.detach().double()[:, dropped.to(fc1.weight.device)].reshape(fc1.weight.shape[0], -1)
                shift = W1 @ se_means[m.name].double().to(W1.device)[dropped.to(W1.device)]
            replace(model, m.name, conv_like(fc1, in_idx=keep, bias_shift=shift))
            replace(model, m.fc2, conv_like(get(m.fc2), out_idx=keep))
        else:  # pragma: no cover
            raise ValueError(f"unknown member kind {m.kind!r}")
    replace(model, group.consumer, conv_like(get(group.consumer), in_idx=keep, in_scale=scale))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example``, as torch.utils.flop_counter counts them
    (convolutions and matrix products, 2 per multiply-add). ``model`` should be in eval mode
    (a forward pass in training mode updates BatchNorm statistics)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(example)
    return int(counter.get_total_flops())

"""gfs as a torch.nn.utils.prune method (gfs.integrations.nn_prune): the structured mask keeps the
channels gfs selects from calibration activations, and works with prune.remove."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import prune

import gfs
from gfs.integrations.nn_prune import GFSStructured, gfs_structured
from gfs.stats import layer_stats

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv_pair(seed=0):
    torch.manual_seed(seed)
    conv, nxt = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 5, 3, padding=1)
    x = torch.randn(8, 3, 9, 9)
    with torch.no_grad():
        h = torch.relu(conv(x))
    return conv, nxt, h


def _kept(weight):
    return torch.nonzero(weight.flatten(1).abs().sum(1) > 0).flatten()


@pytest.mark.parametrize("amount", [0.5, 7, 0.25])
def test_the_mask_keeps_gfs_selection_for_the_consumer(amount):
    conv, nxt, h = _conv_pair()
    n_prune = amount if isinstance(amount, int) else round(amount * 12)
    expected = gfs.select(layer_stats(nxt, h), k=12 - n_prune, replacement=False).support
    original = conv.weight.detach().clone()
    gfs_structured(conv, "weight", amount=amount, activations=h, consumer=nxt)
    assert hasattr(conv, "weight_mask") and hasattr(conv, "weight_orig")
    assert torch.equal(_kept(conv.weight), expected)
    assert torch.equal(conv.weight[expected], original[expected])
    prune.remove(conv, "weight")
    assert not hasattr(conv, "weight_mask") and isinstance(conv.weight, nn.Parameter)
    assert torch.equal(_kept(conv.weight), expected)


def test_batches_of_activations_are_summed_and_linear_consumers_work():
    torch.manual_seed(1)
    fc, out = nn.Linear(6, 16), nn.Linear(16, 3)
    hs = [torch.relu(fc(torch.randn(20, 6))).detach() for _ in range(3)]
    stats = layer_stats(out, hs[0])
    for h in hs[1:]:
        layer_stats(out, h, out=stats)
    expected = gfs.select(stats, k=8, replacement=False).support
    method = GFSStructured.apply(fc, "weight", 0.5, hs, out)
    assert torch.equal(_kept(fc.weight), expected)
    assert torch.equal(method.selection.support, expected)


def test_without_a_consumer_the_channels_imitate_their_mean():
    conv, _, h = _conv_pair(2)
    U = h.transpose(0, 1).reshape(12, -1)
    expected = gfs.select(U, U.mean(0), k=6, replacement=False).support
    gfs_structured(conv, "weight", amount=0.5, activations=h)
    assert torch.equal(_kept(conv.weight), expected)


def test_the_selection_is_gfs_prune_local_on_one_group():
    conv, nxt, h = _conv_pair(3)
    net = nn.Sequential(conv, nn.ReLU(), nxt)
    x = torch.randn(8, 3, 9, 9)
    with torch.no_grad():
        h = torch.relu(conv(x))
    ref = gfs.prune(net, x, ratio=0.5, progress=False)
    gfs_structured(conv, "weight", amount=0.5, activations=h, consumer=nxt)
    assert torch.equal(_kept(conv.weight), ref.report[0].kept)


def test_errors_name_the_problem():
    conv, nxt, h = _conv_pair()
    with pytest.raises(ValueError, match="consumer reads 12 channels"):
        gfs_structured(conv, "weight", amount=0.5, activations=h[:, :6], consumer=nxt)
    with pytest.raises(TypeError, match="consumer"):
        gfs_structured(conv, "weight", amount=0.5, activations=h, consumer=nn.ReLU())
    with pytest.raises(ValueError, match="amount"):
        gfs_structured(conv, "weight", amount=1.5, activations=h, consumer=nxt)
    with pytest.raises(ValueError, match="NaN"):
        gfs_structured(conv, "weight", amount=0.5, activations=torch.full_like(h, float("nan")), consumer=nxt)
    with pytest.raises(ValueError, match="empty"):
        gfs_structured(conv, "weight", amount=0.5, activations=[], consumer=nxt)
    gfs_structured(conv, "weight", amount=0.5, activations=h, consumer=nxt)
    with pytest.raises(ValueError, match="remaining"):  # a second structured pruning needs the remaining channels'
        gfs_structured(conv, "weight", amount=2, activations=h, consumer=nxt)

"""The CIFAR-style models of gfs.models (ResNet-56, VGG-16-BN): built without downloads, a forward
pass at 32x32, the channel groups gfs.prune finds in them, and pruning them to half their internal
channels on tiny data with a fold error of ~0 (the pruned network computes what the selection
chose), saved and loaded back."""

from __future__ import annotations

import fnmatch

import pytest
import torch

import gfs
from gfs.models import CIFAR_MODELS, MODELS, build_model, internal_layers
from gfs.pruning import find_groups, load
from gfs.pruning.fold import count_flops, count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


def _with_statistics(model, size=32, seed=0):
    """The model after a few forward passes in training mode (BatchNorm statistics that are not
    the identity), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, size, size, generator=g))
    return model.eval()


def test_the_zoo_names_them():
    assert set(CIFAR_MODELS) == {"resnet56", "vgg16_bn"} and set(CIFAR_MODELS) <= set(MODELS)
    with pytest.raises(ValueError, match="unknown model 'resnet57'"):
        build_model("resnet57", 10)


def test_resnet56_is_he_et_al_cifar_resnet():
    net = build_model("resnet56", 10, seed=0).eval()
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 1 + 2 * 27  # the stem and two per BasicBlock: with the classifier, 56 layers
    assert [len(getattr(net, f"layer{i}")) for i in (1, 2, 3)] == [9, 9, 9]
    assert [net.layer1[0].conv1.out_channels, net.layer2[0].conv1.out_channels, net.layer3[0].conv1.out_channels] == [
        16,
        32,
        64,
    ]
    # option B: a 1x1 convolution with stride 2 and BatchNorm where the shape changes, identity elsewhere
    assert net.layer1[0].downsample is None and net.layer2[1].downsample is None
    down = net.layer2[0].downsample
    assert down[0].kernel_size == (1, 1) and down[0].stride == (2, 2) and isinstance(down[1], torch.nn.BatchNorm2d)
    assert count_parameters(net) == 855_770
    assert count_flops(net, torch.zeros(1, 3, 32, 32)) == 251_495_680  # 2 per multiply-add
    assert torch.equal(build_model("resnet56", 10, seed=3).fc.weight, build_model("resnet56", 10, seed=3).fc.weight)


def test_vgg16_bn_for_32x32():
    net = build_model("vgg16_bn", 7, seed=0).eval()
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) == 13 and len(linears) == 3  # 16 layers with weights
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 13


def test_find_groups_finds_the_internal_channels():
    r56 = build_model("resnet56", 10)
    scan = find_groups(r56, torch.zeros(2, 3, 32, 32))
    blocks = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(9)]
    assert scan.names() == blocks  # exactly conv1 of every block: the residual stream is left whole
    assert [scan[n].channels for n in blocks] == [16] * 9 + [32] * 9 + [64] * 9
    assert all(scan[n].consumer == n.replace("conv1", "conv2") for n in blocks)
    assert "layer1.0.conv2" in scan.rejected and "layer2.0.downsample.0" in scan.rejected and "conv1" in scan.rejected
    assert internal_layers("resnet56") is None  # every group found is internal

    vgg = build_model("vgg16_bn", 10)
    scan = find_groups(vgg, torch.zeros(2, 3, 32, 32))
    convs = [n for n, m in vgg.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert scan.names()[:13] == convs  # every convolution, the last through pool and flatten to the classifier
    assert scan[convs[-1]].consumer == "classifier.0"
    internal = [g.name for g in scan.groups if any(fnmatch.fnmatchcase(g.name, p) for p in internal_layers("vgg16_bn"))]
    assert internal == convs  # not the hidden units of the classifier


@pytest.mark.parametrize("name", ["resnet56", "vgg16_bn"])
def test_prune_half_the_internal_channels(name, tmp_path):
    model = _with_statistics(build_model(name, 10, seed=1))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, 32, 32, generator=g)
    result = gfs.prune(model, [x[:4], x[4:]], ratio=0.5, layers=internal_layers(name), progress=False)
    groups = 27 if name == "resnet56" else 13
    assert len(result.report) == groups
    assert all(r.channels_after == (r.channels_before + 1) // 2 for r in result.report)
    assert max(r.fold_error for r in result.report) < 1e-4  # the pruned network is what the selection chose
    pruned = result.model
    assert pruned(x).shape == (8, 10)
    assert result.flops[1] < 0.55 * result.flops[0] and result.params[1] < result.params[0]
    path = str(tmp_path / f"{name}.safetensors")
    result.save(path)  # torchvision's / torch.nn's classes only: no allowed= needed
    back = load(path)
    assert torch.allclose(back(x), pruned(x), atol=1e-5)

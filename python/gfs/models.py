"""The model zoo of `gfs prune`, `gfs demo` and the benchmarks: torchvision classifiers built
with ``weights=None``, the CIFAR-style ResNet-56 and VGG-16-BN for 32x32 images, and which of
their channel groups are "internal".

    model = build_model("resnet56", classes=10, seed=0)
    gfs.prune(model, calibration, ratio=0.5, layers=internal_layers("resnet56"))

- ``resnet56``: He et al. 2016, Section 4.2 (the CIFAR-10 ResNets): a 3x3 stem convolution of
  16 channels, three stages of 9 BasicBlocks with 16, 32 and 64 channels (stride 2 at the start
  of stages 2 and 3), global average pooling and one linear layer: 1 + 2 * 27 + 1 = 56 layers
  with weights, 0.85M parameters, 0.25 GFLOPs per 32x32 image (2 per multiply-add). Shortcuts
  are *option B*: identity inside a stage, a 1x1 convolution with stride 2 and BatchNorm where
  the shape changes (the paper's CIFAR models used option A, zero-padded identity shortcuts;
  option B is what Torch-Pruning's benchmark models and most pruning papers' ResNet-56 use, and
  it keeps the graph free of a zero-padding lambda). It is built from torchvision's ResNet and
  BasicBlock classes (stem 3x3, no max-pool, ``layer4`` an Identity), so the module names are
  torchvision's (``layer2.0.conv1``, ``layer2.0.downsample.0``, ``fc``) and gfs.pruning.save /
  load (whose allow-list names torchvision's classes) and Torch-Pruning take it as it is.
- ``vgg16_bn``: VGG-16 with BatchNorm for 32x32 inputs, as in the CIFAR versions of the
  pruning literature: 13 3x3 convolutions (64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M,
  512 x3, M; each followed by BatchNorm and ReLU, M a 2x2 max-pool), which leave a 1x1 map of
  512 channels, then a classifier of three linear layers (512 -> 512 -> 512 -> classes, ReLU
  and dropout 0.5 between them): 16 layers with weights, 15.3M parameters, 0.63 GFLOPs per
  image. It is a plain ``nn.Sequential`` (``features``, ``flatten``, ``classifier``) of
  torch.nn layers.

Both take 3-channel images (gfs.data pads the 28x28 grey Fashion-MNIST / MNIST images to 32x32
and repeats them to 3 channels). ResNet-56 takes any size (global pooling); VGG-16-BN needs
32x32, the size whose five max-pools leave the 1x1 map its classifier reads.

Weights files (state dicts) are read and written by :mod:`gfs.weights`.
"""

from __future__ import annotations

TORCHVISION_MODELS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
)
CIFAR_MODELS = ("resnet56", "vgg16_bn")  # defined here, for 32x32 images
MODELS = TORCHVISION_MODELS + CIFAR_MODELS

# Which channel groups are "internal" (the hidden channels of each residual block), per model.
# ResNets: every group gfs.prune finds is inside a block (conv1 of BasicBlock, conv1 / conv2 of
# Bottleneck); ResNet-56 likewise (conv1 of each of its 27 blocks). MobileNets: the expanded
# hidden channels of the inverted residuals (and the stem's, which are the hidden channels of the
# first block when it has no expand layer); not the squeeze-excitation bottlenecks, the
# projections between blocks nor the classifier head. VGG-16-BN: the output channels of its 13
# convolutions (not the hidden units of the classifier).
_INTERNAL = {
    "mobilenet_v2": ["features.0.0", "features.*.conv.0.0"],
    "mobilenet_v3_small": ["features.0.0", "features.*.block.0.0"],
    "mobilenet_v3_large": ["features.*.block.0.0"],
    "vgg16_bn": ["features.*"],
}

# VGG-16's convolutions: channels, "M" a 2x2 max-pool.
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _known(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return name


def internal_layers(name: str):
    """``layers=`` for :func:`gfs.prune` selecting the internal channels of model ``name``
    (None: every group found, which for ResNets is exactly the block-internal ones)."""
    _known(name)
    return list(_INTERNAL[name]) if name in _INTERNAL else None


def build_model(name: str, classes: int, *, seed: int = 0):
    """Model ``name`` with ``weights=None`` (nothing is downloaded) and ``classes`` outputs,
    initialised from torch's generator seeded by ``seed`` (the caller's random state is left
    alone)."""
    import torch
    import torchvision

    _known(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if name == "resnet56":
            return resnet56(int(classes))
        if name == "vgg16_bn":
            return vgg16_bn(int(classes))
        return getattr(torchvision.models, name)(weights=None, num_classes=int(classes))


def cifar_resnet(blocks: int, classes: int = 10, widths=(16, 32, 64)):
    """The CIFAR ResNet of He et al. 2016 (Section 4.2) with ``blocks`` BasicBlocks per stage
    (9: ResNet-56, 3: ResNet-20) and option-B shortcuts, as a torchvision ``ResNet`` (see the
    module notes). Initialised as torchvision initialises its ResNets (Kaiming-normal
    convolutions, BatchNorm weight 1 and bias 0), from torch's global generator."""
    import torch.nn as nn
    from torchvision.models.resnet import BasicBlock, ResNet, conv1x1

    net = ResNet.__new__(ResNet)
    nn.Module.__init__(net)
    net._norm_layer = nn.BatchNorm2d
    net.groups, net.base_width, net.dilation = 1, 64, 1
    net.inplanes = widths[0]
    net.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
    net.bn1 = nn.BatchNorm2d(widths[0])
    net.relu = nn.ReLU(inplace=True)
    net.maxpool = nn.Identity()
    stages = []
    for i, width in enumerate(widths):
        stride = 1 if i == 0 else 2
        layers = []
        for b in range(blocks):
            down = None
            if b == 0 and (stride != 1 or net.inplanes != width):
                down = nn.Sequential(conv1x1(net.inplanes, width, stride), nn.BatchNorm2d(width))
            layers.append(BasicBlock(net.inplanes, width, stride if b == 0 else 1, down))
            net.inplanes = width
        stages.append(nn.Sequential(*layers))
    net.layer1, net.layer2, net.layer3 = stages
    net.layer4 = nn.Identity()
    net.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    net.fc = nn.Linear(widths[-1], classes)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def resnet56(classes: int = 10):
    """ResNet-56 for 32x32 images (He et al. 2016; option-B shortcuts): see the module notes."""
    return cifar_resnet(9, classes)


def vgg16_bn(classes: int = 10, dropout: float = 0.5):
    """VGG-16 with BatchNorm for 32x32 images, an ``nn.Sequential`` (see the module notes).
    Initialised as torchvision initialises its VGGs (Kaiming-normal convolutions, BatchNorm 1 / 0,
    linear weights N(0, 0.01), biases 0), from torch's global generator."""
    from collections import OrderedDict

    import torch.nn as nn

    features, channels = [], 3
    for v in VGG16_CONFIG:
        if v == "M":
            features.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            features += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            channels = v
    net = nn.Sequential(
        OrderedDict(
            features=nn.Sequential(*features),
            flatten=nn.Flatten(1),
            classifier=nn.Sequential(
                nn.Linear(512, 512),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(512, 512),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(512, classes),
            ),
        )
    )
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return net

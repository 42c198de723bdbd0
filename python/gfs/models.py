"""The model zoo of `gfs prune`, `gfs demo` and benchmarks/prune_baselines.py: torchvision
classifiers built with ``weights=None``, and which of their channel groups are "internal".

    model = build_model("resnet18", classes=10, seed=0)
    gfs.prune(model, calibration, ratio=0.5, layers=internal_layers("resnet18"))

Weights files (state dicts) are read and written by :mod:`gfs.weights`.
"""

from __future__ import annotations

MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")

# Which channel groups are "internal" (the hidden channels of each residual block), per model.
# ResNets: every group gfs.prune finds is inside a block (conv1 of BasicBlock, conv1 / conv2 of
# Bottleneck). MobileNets: the expanded hidden channels of the inverted residuals (and the
# stem's, which are the hidden channels of the first block when it has no expand layer); not the
# squeeze-excitation bottlenecks, the projections between blocks nor the classifier head.
_INTERNAL = {
    "mobilenet_v2": ["features.0.0", "features.*.conv.0.0"],
    "mobilenet_v3_small": ["features.0.0", "features.*.block.0.0"],
    "mobilenet_v3_large": ["features.*.block.0.0"],
}


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
    """torchvision model ``name`` with ``weights=None`` and ``classes`` outputs, initialised
    from torch's generator seeded by ``seed`` (the caller's random state is left alone)."""
    import torch
    import torchvision

    _known(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return getattr(torchvision.models, name)(weights=None, num_classes=int(classes))

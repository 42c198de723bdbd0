"""Models gfs.prune refuses (grouped convolutions, LayerNorm blocks, attention, residual streams)
prune end to end through Torch-Pruning with gfs scores and compensation (small inputs)."""

from __future__ import annotations

import pytest
import torch

import gfs

tp = pytest.importorskip("torch_pruning")
tv = pytest.importorskip("torchvision")

from gfs.integrations.torch_pruning import GFSImportance  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

MODELS = ["resnet18", "mobilenet_v2", "resnext50_32x4d", "regnet_x_400mf", "convnext_tiny", "vit_b_16"]


def _build(name):
    torch.manual_seed(0)
    kwargs = {"image_size": 32} if name == "vit_b_16" else {}
    return getattr(tv.models, name)(weights=None, num_classes=10, **kwargs).eval()


def _widths(model):
    return {
        n: (m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    }


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in ("convnext_tiny", "vit_b_16") else n for n in MODELS]
)
def test_prunes_end_to_end_with_gfs_scores_and_compensation(name):
    net = _build(name)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    widths = _widths(net)
    calib = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    # Torch-Pruning prunes in place: prune a copy (gfs.integrations.torch_pruning.prune does this in one call)
    model = _build(name)
    model.load_state_dict(net.state_dict())
    imp = GFSImportance()
    pruner = tp.pruner.BasePruner(model, calib[0][:1], importance=imp, pruning_ratio=0.5)
    imp.calibrate(pruner, calib)
    pruner.step()
    report = imp.compensate()  # (also repairs what torchvision's ViT reads in forward: hidden_dim)

    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the input model is untouched
    assert report and all(0 < r.channels[1] < r.channels[0] for r in report)
    after = _widths(model)
    assert sum(after.values()) < 0.6 * sum(widths.values())
    assert after[[n for n in widths if widths[n] == 10][-1]] == 10  # the classifier's outputs stay
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (3, 10) and bool(torch.isfinite(y).all())


def test_gfs_prune_points_to_torch_pruning_where_it_refuses():
    class Grouped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 8, 3)
            self.g = torch.nn.Conv2d(8, 8, 3, groups=2)

        def forward(self, x):
            return self.g(torch.relu(self.a(x)))

    with pytest.raises(gfs.pruning.UnsupportedModelError, match="torch_pruning"):
        gfs.prune(Grouped(), torch.randn(2, 3, 12, 12), ratio=0.5, progress=False)
    with pytest.raises(gfs.pruning.UnsupportedModelError, match="torch_pruning"):
        gfs.prune(Grouped(), torch.randn(2, 3, 12, 12), ratio=0.5, progress=False, layers=["a"])

"""Prune a torchvision ResNet with Torch-Pruning, gfs choosing the channels and re-weighting the kept ones.

pip install 'gfs[torch-pruning]' && python examples/torch_pruning_resnet.py
"""

import torch
import torch_pruning as tp
import torchvision

from gfs.integrations.torch_pruning import GFSImportance

model = torchvision.models.resnet18(weights=None, num_classes=10).eval()  # or your trained model
calibration = [torch.randn(16, 3, 32, 32) for _ in range(2)]  # or batches of your DataLoader
x = torch.randn(8, 3, 32, 32)
with torch.no_grad():
    dense = model(x)

importance = GFSImportance()  # sequential: each group solved on the network pruned so far
pruner = tp.pruner.BasePruner(model, x[:1], importance=importance, pruning_ratio=0.5, ignored_layers=[model.fc])
importance.calibrate(pruner, calibration)  # records the batches: no hooks to write
pruner.step()  # Torch-Pruning removes the channels gfs ranks last, in every coupled layer
report = importance.compensate()  # the kept channels re-weighted in the layers that read them

macs, params = tp.utils.count_ops_and_params(model, x[:1])
with torch.no_grad():
    change = float((model(x) - dense).norm() / dense.norm())
print(f"{len(report)} channel groups pruned: {params / 1e6:.2f}M parameters, {macs / 1e6:.1f}M MACs per image")
print(f"relative change of the logits on new inputs: {change:.3f}")

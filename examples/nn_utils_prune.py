"""gfs as a torch.nn.utils.prune method: a structured mask keeping the output channels gfs selects.

python examples/nn_utils_prune.py
"""

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.utils import prune

from gfs.integrations.nn_prune import GFSStructured

X, labels = load_digits(return_X_y=True)
X, labels = torch.tensor(X, dtype=torch.float32) / 16, torch.tensor(labels)
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
for _ in range(150):  # a second of full-batch training
    optimizer.zero_grad()
    nn.functional.cross_entropy(net(X), labels).backward()
    optimizer.step()


def accuracy():
    with torch.no_grad():
        return float(net(X).argmax(1).eq(labels).float().mean())


print(f"dense: accuracy {accuracy():.1%}")
with torch.no_grad():
    h = net[:2](X)  # calibration activations of net[0]'s 128 output channels: the input of their consumer, net[2]
# keep 16 of them (or: gfs_structured(net[0], "weight", 112, h, net[2]))
method = GFSStructured.apply(net[0], "weight", amount=112, activations=h, consumer=net[2], step="line_search")
prune.custom_from_mask(net[0], "bias", net[0].weight_mask[:, 0])  # the bias of a pruned channel too
for name in ("weight", "bias"):
    prune.remove(net[0], name)  # permanent: the pruned rows are zeros
kept = method.selection.support
print(f"masked to channels {kept.tolist()}: accuracy {accuracy():.1%}")
with torch.no_grad():  # a mask cannot re-weight the consumer; gfs's weights folded by hand (gfs.prune does it):
    net[2].weight[:, kept] *= (128 * method.selection.weights[kept]).float()
print(f"with gfs's weights folded into the consumer: accuracy {accuracy():.1%}")

"""gfs.select on features you computed yourself: keep 64 of the 512 hidden units of a random-feature
model on scikit-learn's digits, re-weighted so that the smaller model imitates the dense one.

    python examples/select_features.py
"""

import torch
from sklearn.datasets import load_digits

import gfs

X, labels = load_digits(return_X_y=True)
X, labels = torch.tensor(X, dtype=torch.float32) / 16, torch.tensor(labels)
train, test = slice(0, 1400), slice(1400, None)
torch.manual_seed(0)
H = torch.relu(X @ torch.randn(64, 512) / 4)  # your features: 512 hidden units
Y = torch.nn.functional.one_hot(labels[train], 10).float()
readout = torch.linalg.solve(H[train].T @ H[train] + 10 * torch.eye(512), H[train].T @ Y)  # ridge readout

# candidate j: N times unit j's contribution to the dense model's output (which is their average)
N, k = H.shape[1], 64
U = N * H[train].T[:, :, None] * readout[:, None, :]  # (N, samples, classes)
target = H[train] @ readout
sel = gfs.select(U, target, k=k, replacement=False)  # the papers' uniform step: weights 1 / k
line = gfs.select(U, target, k=k, replacement=False, step="line_search")  # z <- z + gamma (u_j - z)


def accuracy(units, scale):
    return float(((H[test][:, units] * scale) @ readout[units]).argmax(1).eq(labels[test]).float().mean())


rand = torch.randperm(N)[:k]
print(f"dense, {N} units: test accuracy {accuracy(torch.arange(N), 1.0):.1%}")
for name, s in (("uniform", sel), ("line_search", line)):
    print(f"gfs {name}, {k} units (weights N w_j): {accuracy(s.support, N * s.weights[s.support].float()):.1%}")
print(f"random, {k} units (weights N / k): {accuracy(rand, N / k):.1%}")
print(f"selection: {sel.engine} engine, {sel.backend} backend, {sel.seconds * 1e3:.0f} ms")

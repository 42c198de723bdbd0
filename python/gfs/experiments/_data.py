"""Data for the studies: scikit-learn's digits (shipped with scikit-learn, no download), MNIST's
training split from local IDX files (read by gfs.data), and class-balanced nested sub-data-sets.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..data import IdxError, _find, read_idx

IdxFormatError = IdxError  # the name the study has always raised


@dataclass
class Dataset:
    """Inputs X (n, d) float32, digit classes (n,) int64, binary labels (n,) float32
    (1 for digit >= 5), and a name for the record."""

    X: np.ndarray
    classes: np.ndarray
    labels: np.ndarray
    name: str

    def __len__(self) -> int:
        return int(self.X.shape[0])


def load_mnist_train(folder: str) -> Dataset:
    """MNIST's 60,000 training images from IDX files in folder, scaled to [0, 1], flattened.
    Only the two training files are needed (plain or gzipped)."""
    if not os.path.isdir(folder):
        raise IdxFormatError(f"--mnist {folder}: not a folder")
    images = read_idx(_find(folder, "train-images-idx3-ubyte"), expect_ndim=3)
    classes = read_idx(_find(folder, "train-labels-idx1-ubyte"), expect_ndim=1).astype(np.int64)
    if images.shape[0] != classes.shape[0]:
        raise IdxFormatError(f"{folder}: {images.shape[0]} images but {classes.shape[0]} labels")
    X = images.reshape(images.shape[0], -1).astype(np.float32) / 255.0
    return Dataset(X, classes, (classes >= 5).astype(np.float32), "mnist")


def load_digits() -> Dataset:
    """scikit-learn's 1,797 8x8 digits (read from the scikit-learn package, no download),
    scaled to [0, 1]."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    X = bunch.data.astype(np.float32) / 16.0
    classes = bunch.target.astype(np.int64)
    return Dataset(X, classes, (classes >= 5).astype(np.float32), "digits")


def normalise(X: np.ndarray) -> np.ndarray:
    """Centre every input coordinate and scale so that the mean squared norm of an input is 1
    (Assumption 2 of the paper bounds ||x||; this keeps w.x of order 1 for w ~ N(0, I))."""
    Xc = X - X.mean(0, keepdims=True)
    scale = float(np.sqrt((Xc.astype(np.float64) ** 2).sum(1).mean()))
    return (Xc / max(scale, 1e-12)).astype(np.float32)


def balanced_quotas(size: int, class_counts: np.ndarray) -> np.ndarray:
    """How many examples of each class a sub-data-set of `size` takes: round-robin over the
    classes in order, skipping full ones, so the quotas differ by at most one where every class
    has enough examples, and grow monotonically with size (the subsets are nested)."""
    class_counts = np.asarray(class_counts, dtype=np.int64)
    if size > int(class_counts.sum()):
        raise ValueError(f"sub-data-set size {size} is larger than the data set ({int(class_counts.sum())} examples)")
    quotas = np.zeros_like(class_counts)
    base = min(size // len(class_counts), int(class_counts.min()))
    quotas[:] = base
    left = size - base * len(class_counts)
    while left > 0:
        for c in range(len(class_counts)):
            if left and quotas[c] < class_counts[c]:
                quotas[c] += 1
                left -= 1
    return quotas


def balanced_subsets(classes: np.ndarray, sizes, seed: int) -> dict[int, np.ndarray]:
    """Class-balanced sub-data-sets, one per size, nested (a smaller one is part of every larger
    one), drawn with `seed`: each class is shuffled once and each subset takes the first
    quota of it. Returns size -> sorted indices."""
    rng = np.random.default_rng(seed)
    labels = np.unique(classes)
    orders = [rng.permutation(np.flatnonzero(classes == c)) for c in labels]
    counts = np.array([len(o) for o in orders])
    out = {}
    for size in sizes:
        q = balanced_quotas(int(size), counts)
        out[int(size)] = np.sort(np.concatenate([o[:n] for o, n in zip(orders, q)]))
    return out

"""Tabular classification data: one row of features per example, and the one `Dataset` type that
holds it (gfs.demo's two-layer network, gfs.experiments' studies).

- `load_digits_split`: the embedded default, scikit-learn's 8x8 digits (1797 images shipped
  inside the scikit-learn package, so nothing is downloaded), standardised with the training
  split's statistics, split into train and test with a fixed, stratified, seeded shuffle.
- `load_digits`: the same 1797 images, scaled to [0, 1], all in the training split (the studies
  draw their own sub-data-sets from it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .splits import stratified_split


@dataclass
class Dataset:
    """A classification data set, already split (and scaled as its loader says).

    x_train, x_test: float32 (n, d); y_train, y_test: int64 (n,) class labels in [0, classes).
    A data set without a test split (the studies' sources) has x_test of shape (0, d).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int

    @property
    def dim(self) -> int:
        return self.x_train.shape[1]

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test, "
            f"{self.dim} features, {self.classes} classes"
        )

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> Dataset:
        """A smaller copy (the first n after a seeded shuffle of each split)."""
        g = torch.Generator().manual_seed(seed)

        def take(x, y, n):
            if n is None or n >= len(x):
                return x, y
            idx = torch.randperm(len(x), generator=g)[:n]
            return x[idx], y[idx]

        xtr, ytr = take(self.x_train, self.y_train, n_train)
        xte, yte = take(self.x_test, self.y_test, n_test)
        return Dataset(self.name, xtr, ytr, xte, yte, self.classes)


def standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero mean, unit variance per feature, with the training split's statistics.

    Constant features (e.g. the always-blank corner pixels) are centred but not scaled.
    """
    mean = x_train.mean(0, keepdims=True)
    std = x_train.std(0, keepdims=True)
    std[std < 1e-8] = 1.0
    return (x_train - mean) / std, (x_test - mean) / std


_DIGITS = "digits (scikit-learn, 8x8)"


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's digits (1797 images of 8x8 pixels, 10 classes), split and standardised.

    Parameters
    ----------
    test_fraction : share of the images held out for testing (stratified by class).
    seed : seed of the split's shuffle; the same seed gives the same split on every machine.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits as sklearn_digits  # lazy: scikit-learn is slow to import

    bunch = sklearn_digits()
    x = bunch.data.astype(np.float64)
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    x_train, x_test = standardise(x[train_idx], x[test_idx])
    return Dataset(
        _DIGITS,
        torch.from_numpy(x_train.astype(np.float32)),
        torch.from_numpy(y[train_idx]),
        torch.from_numpy(x_test.astype(np.float32)),
        torch.from_numpy(y[test_idx]),
        10,
    )


def load_digits() -> Dataset:
    """All of scikit-learn's 1797 digits (read from the scikit-learn package, no download), pixels
    scaled to [0, 1], in the training split; the test split is empty."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return Dataset(_DIGITS, x, y, x[:0], y[:0], 10)

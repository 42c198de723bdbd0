"""Which examples go where: a stratified train / test split, and class-balanced nested subsets.

Both take class labels (a numpy int array) and a seed, and return indices; the same seed gives
the same indices on every machine.
"""

from __future__ import annotations

import numpy as np


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): the same share of every class held out, seeded shuffles."""
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):  # stratified: the same share of every class in the test split
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(test_idx))


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
        out[int(size)] = np.sort(np.concatenate([o[:n] for o, n in zip(orders, q, strict=True)]))
    return out

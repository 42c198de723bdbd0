"""Data for the studies: scikit-learn's digits (shipped with scikit-learn, no download), MNIST
from local IDX files, and class-balanced nested sub-data-sets.

The IDX reader here is small and self-contained; when `gfs.data.load_mnist_idx` (branch demo)
lands on main, the study can switch to it.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np

# IDX type codes (the third byte of the magic number) -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IdxFormatError(ValueError):
    """A file that is not a readable IDX file, or a folder without the MNIST training files."""


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


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array of its stored shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IdxFormatError(f"{path}: not an IDX file (the magic number must start with two zero bytes)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise IdxFormatError(f"{path}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated header")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header < count * dtype.itemsize:
        raise IdxFormatError(f"{path}: holds {len(raw) - header} data bytes, the header promises {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(folder: str, stem: str) -> str:
    """The file in folder for stem ("train-images" / "train-labels"), with either spelling
    (train-images-idx3-ubyte or train-images.idx3-ubyte), gzipped or not."""
    kind = "idx3" if "images" in stem else "idx1"
    for sep in ("-", "."):
        for ext in ("", ".gz"):
            path = os.path.join(folder, f"{stem}{sep}{kind}-ubyte{ext}")
            if os.path.exists(path):
                return path
    raise IdxFormatError(
        f"{folder}: no {stem}-{kind}-ubyte[.gz] file; --mnist needs the folder holding the MNIST IDX files "
        f"(train-images-idx3-ubyte and train-labels-idx1-ubyte, gzipped or not)"
    )


def load_mnist_train(folder: str) -> Dataset:
    """MNIST's 60,000 training images from IDX files in folder, scaled to [0, 1], flattened."""
    if not os.path.isdir(folder):
        raise IdxFormatError(f"--mnist {folder}: not a folder")
    images = read_idx(_find(folder, "train-images"))
    classes = read_idx(_find(folder, "train-labels")).astype(np.int64)
    if images.ndim != 3 or classes.ndim != 1 or images.shape[0] != classes.shape[0]:
        raise IdxFormatError(f"{folder}: images {images.shape} and labels {classes.shape} do not match")
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

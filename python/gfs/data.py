"""Data sets for the demo and the studies.

- `load_digits_split`: the embedded default, scikit-learn's 8x8 digits (1797 images shipped
  inside the scikit-learn package, so nothing is downloaded), standardised with the training
  split's statistics, split into train and test with a fixed, stratified, seeded shuffle.
- `load_mnist_idx`: real MNIST from the four IDX files in a local folder (plain or gzipped),
  with the magic numbers, dimensions and file sizes checked.
- `read_idx` / `write_idx`: the IDX format itself (write is used by tests and tools that make
  small IDX files).
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Dataset", "load_digits_split", "load_mnist_idx", "read_idx", "write_idx", "IdxError", "MNIST_FILES"]


class IdxError(ValueError):
    """An IDX file is missing, truncated, or not the kind of file expected."""


@dataclass
class Dataset:
    """A classification data set, already split and standardised.

    x_train, x_test: float32 (n, d); y_train, y_test: int64 (n,) class labels in [0, classes).
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

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> "Dataset":
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


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero mean, unit variance per feature, with the training split's statistics.

    Constant features (e.g. the always-blank corner pixels) are centred but not scaled.
    """
    mean = x_train.mean(0, keepdims=True)
    std = x_train.std(0, keepdims=True)
    std[std < 1e-8] = 1.0
    return (x_train - mean) / std, (x_test - mean) / std


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's digits (1797 images of 8x8 pixels, 10 classes), split and standardised.

    Parameters
    ----------
    test_fraction : share of the images held out for testing (stratified by class).
    seed : seed of the split's shuffle; the same seed gives the same split on every machine.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits  # lazy: scikit-learn is slow to import

    bunch = load_digits()
    x = bunch.data.astype(np.float64)
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):  # stratified: the same share of every class in the test split
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(np.concatenate(test_idx))
    x_train, x_test = _standardise(x[train_idx], x[test_idx])
    return Dataset(
        "digits (scikit-learn, 8x8)",
        torch.from_numpy(x_train.astype(np.float32)),
        torch.from_numpy(y[train_idx]),
        torch.from_numpy(x_test.astype(np.float32)),
        torch.from_numpy(y[test_idx]),
        10,
    )


# -- IDX ------------------------------------------------------------------------------------

# IDX type codes: the third byte of the magic number.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# name -> (IDX magic number, number of dimensions)
MNIST_FILES = {
    "train-images-idx3-ubyte": (0x00000803, 3),
    "train-labels-idx1-ubyte": (0x00000801, 1),
    "t10k-images-idx3-ubyte": (0x00000803, 3),
    "t10k-labels-idx1-ubyte": (0x00000801, 1),
}


def _open_bytes(path: str) -> bytes:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise IdxError(f"{path}: cannot read ({exc})") from exc


def read_idx(path: str, expect_magic: int | None = None, expect_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (plain, or gzipped when the name ends in .gz) into a numpy array.

    The header is two zero bytes, a type code, the number of dimensions, then each dimension as
    a big-endian uint32; the data follow. Raises `IdxError` naming the file when the magic
    number, the number of dimensions or the file's size is not what the header (and the caller)
    say.
    """
    raw = _open_bytes(path)
    if len(raw) < 4:
        raise IdxError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    magic = struct.unpack(">I", raw[:4])[0]
    zero, code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or code not in _IDX_DTYPES:
        raise IdxError(
            f"{path}: bad magic number 0x{magic:08x} (an IDX file starts with 0x0000, a type code "
            f"in {{{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}}} and the number of dimensions); "
            "is this an IDX file, or a gzipped one without the .gz suffix?"
        )
    if expect_magic is not None and magic != expect_magic:
        raise IdxError(f"{path}: bad magic number 0x{magic:08x}, expected 0x{expect_magic:08x}")
    if expect_ndim is not None and ndim != expect_ndim:
        raise IdxError(f"{path}: {ndim} dimensions, expected {expect_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{path}: truncated header ({len(raw)} bytes, {header} needed for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    need = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != need:
        raise IdxError(
            f"{path}: {len(raw)} bytes, but the header's shape {tuple(shape)} of {dtype.name} "
            f"needs {need} (file truncated or padded?)"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a numpy array as an IDX file (gzipped when the name ends in .gz)."""
    array = np.asarray(array)
    for code, dtype in _IDX_DTYPES.items():
        if dtype.kind == array.dtype.kind and dtype.itemsize == array.dtype.itemsize:
            break
    else:
        raise ValueError(f"IDX has no type code for {array.dtype}")
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


def _find(directory: str, name: str) -> str:
    for candidate in (name, name + ".gz", name.replace("-idx", ".idx")):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    raise IdxError(f"{os.path.join(directory, name)}: not found (nor {name}.gz) in {directory!r}")


def load_mnist_idx(directory: str, standardise: bool = True) -> Dataset:
    """MNIST (or any data set in MNIST's four-file IDX layout) from a local folder.

    Reads train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
    t10k-labels-idx1-ubyte, each plain or gzipped (name + ".gz"). Images become float32 rows of
    rows*cols pixels, scaled to [0, 1] and then, with `standardise`, to zero mean and unit
    variance per pixel using the training statistics.

    Raises `IdxError`, naming the file, when a file is missing, has the wrong magic number, or
    when images and labels disagree in count or an image set's size does not match.
    """
    if not os.path.isdir(directory):
        raise IdxError(f"{directory!r}: not a folder (pass the folder holding the four MNIST IDX files)")
    arrays = {}
    paths = {}
    for name, (magic, ndim) in MNIST_FILES.items():
        paths[name] = _find(directory, name)
        arrays[name] = read_idx(paths[name], expect_magic=magic, expect_ndim=ndim)
    splits = {}
    for split in ("train", "t10k"):
        images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        if len(images) != len(labels):
            raise IdxError(
                f"{paths[f'{split}-labels-idx1-ubyte']}: {len(labels)} labels, but "
                f"{paths[f'{split}-images-idx3-ubyte']} has {len(images)} images"
            )
        splits[split] = (images.reshape(len(images), -1).astype(np.float64) / 255.0, labels.astype(np.int64))
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["t10k"]
    if x_train.shape[1] != x_test.shape[1]:
        raise IdxError(
            f"{paths['t10k-images-idx3-ubyte']}: images of {x_test.shape[1]} pixels, but the training "
            f"images in {paths['train-images-idx3-ubyte']} have {x_train.shape[1]}"
        )
    if standardise:
        x_train, x_test = _standardise(x_train, x_test)
    classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    return Dataset(
        f"MNIST (IDX files in {directory})",
        torch.from_numpy(x_train.astype(np.float32)),
        torch.from_numpy(y_train),
        torch.from_numpy(x_test.astype(np.float32)),
        torch.from_numpy(y_test),
        max(classes, 10),
    )

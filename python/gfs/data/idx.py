"""The IDX file format (MNIST's), and MNIST-layout data sets read from local IDX files.

- `read_idx` / `write_idx`: the format itself (write is used by tests and tools that make
  small IDX files), plain or gzipped, with the magic number, dimensions and file size checked.
- `read_idx_splits`: the raw uint8 images and labels of a data set in MNIST's four-file layout
  (MNIST, Fashion-MNIST) from a local folder, plain or gzipped; `load_mnist_idx`: the same as
  rows of features (the two-layer studies). The CNN loaders are in gfs.data.images.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import torch

from .tabular import Dataset
from .tabular import standardise as _standardise


class IdxError(ValueError):
    """An IDX file is missing, truncated, or not the kind of file expected."""


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
    codes = [c for c, d in _IDX_DTYPES.items() if d.kind == array.dtype.kind and d.itemsize == array.dtype.itemsize]
    if not codes:
        raise ValueError(f"IDX has no type code for {array.dtype}")
    code, dtype = codes[0], _IDX_DTYPES[codes[0]]
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


def read_idx_splits(directory: str, *, test: bool = True, layout: str = "MNIST") -> dict:
    """The raw arrays of a data set in MNIST's four-file IDX layout (MNIST, Fashion-MNIST, ...).

    Reads train-images-idx3-ubyte and train-labels-idx1-ubyte and, with ``test``,
    t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte from ``directory``, each plain or gzipped
    (name + ".gz", as the Debian package dataset-fashion-mnist ships them). Returns
    ``{"train": (images, labels), "t10k": (images, labels)}`` (no "t10k" without ``test``):
    images as stored, (n, rows, cols) uint8; labels (n,) int64.

    Raises `IdxError`, naming the file, when a file is missing, has the wrong magic number, or
    when images and labels disagree in count or the two splits in image size. ``layout`` names
    the data set in the message for a missing folder.
    """
    wanted = [split for split in ("train", "t10k") if test or split == "train"]
    files = {name: v for name, v in MNIST_FILES.items() if name.split("-")[0] in wanted}
    if not os.path.isdir(directory):
        raise IdxError(
            f"{directory!r}: not a folder (pass the folder holding the {layout} IDX files {', '.join(files)}, "
            "each plain or .gz)"
        )
    arrays = {}
    paths = {}
    for name, (magic, ndim) in files.items():
        paths[name] = _find(directory, name)
        arrays[name] = read_idx(paths[name], expect_magic=magic, expect_ndim=ndim)
    splits = {}
    for split in wanted:
        images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        if len(images) != len(labels):
            raise IdxError(
                f"{paths[f'{split}-labels-idx1-ubyte']}: {len(labels)} labels, but "
                f"{paths[f'{split}-images-idx3-ubyte']} has {len(images)} images"
            )
        splits[split] = (images, labels.astype(np.int64))
    if test and splits["train"][0].shape[1:] != splits["t10k"][0].shape[1:]:
        raise IdxError(
            f"{paths['t10k-images-idx3-ubyte']}: images of {splits['t10k'][0].shape[1:]} pixels, but the training "
            f"images in {paths['train-images-idx3-ubyte']} have {splits['train'][0].shape[1:]}"
        )
    return splits


def load_mnist_idx(directory: str, standardise: bool = True, *, test: bool = True, name: str = "MNIST") -> Dataset:
    """MNIST (or any data set in MNIST's four-file IDX layout, e.g. Fashion-MNIST) from a local folder.

    Reads train-images-idx3-ubyte, train-labels-idx1-ubyte and, with `test`,
    t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each plain or gzipped (name + ".gz").
    Images become float32 rows of rows*cols pixels, scaled to [0, 1] and then, with
    `standardise`, to zero mean and unit variance per pixel using the training statistics.
    Without `test` only the two training files are read, and the test split is empty.
    `name` names the data set in the result (``Dataset.name``) and in errors.

    Raises `IdxError`, naming the file, when a file is missing, has the wrong magic number, or
    when images and labels disagree in count or an image set's size does not match.
    """
    splits = {
        split: (images.reshape(len(images), -1).astype(np.float64) / 255.0, labels)
        for split, (images, labels) in read_idx_splits(directory, test=test, layout=name).items()
    }
    x_train, y_train = splits["train"]
    x_test, y_test = splits.get("t10k", (x_train[:0], y_train[:0]))
    if standardise:
        x_train, x_test = _standardise(x_train, x_test)
    classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    return Dataset(
        f"{name} (IDX files in {directory})",
        torch.from_numpy(x_train.astype(np.float32)),
        torch.from_numpy(y_train),
        torch.from_numpy(x_test.astype(np.float32)),
        torch.from_numpy(y_test),
        max(classes, 10),
    )

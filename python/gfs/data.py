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

__all__ = ["Dataset", "load_digits_split", "ImageData", "load_image_data", "DataSpecError", "DATA_SPECS", "load_mnist_idx", "read_idx", "write_idx", "IdxError", "MNIST_FILES"]


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


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): the same share of every class held out, seeded shuffles."""
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):  # stratified: the same share of every class in the test split
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(test_idx))


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
    train_idx, test_idx = _stratified_split(y, test_fraction, seed)
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


# -- image classification data for CNNs (gfs prune, the demo's CNN part, the baselines) -------

DATA_SPECS = (
    "digits (the default: scikit-learn's 8x8 digits, shipped with scikit-learn, upsampled to RGB images)",
    "cifar10:DIR (DIR/cifar-10-batches-py, as torchvision.datasets.CIFAR10(root=DIR) reads it)",
    "imagefolder:DIR (class sub-folders of images; DIR/train and DIR/val if present, else a seeded split of DIR)",
)

# per-channel statistics of the usual normalisations
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataSpecError(ValueError):
    """A data spec (the CLI's --data) is malformed, or names files that are not there."""


@dataclass
class ImageData:
    """Image classification data, split into train and test.

    Attributes
    ----------
    name : str
        What was loaded, for reports.
    train, test : torch.utils.data.Dataset
        Items are ``(image, label)``: a float32 tensor (3, image_size, image_size), normalised,
        and an int label in [0, classes).
    classes : int
    image_size : int
        Side of the square images.
    spec : str
        The spec it was loaded from (``"digits"``, ``"cifar10:DIR"``, ``"imagefolder:DIR"``).
    """

    name: str
    train: "torch.utils.data.Dataset"
    test: "torch.utils.data.Dataset"
    classes: int
    image_size: int
    spec: str

    def describe(self) -> str:
        return (f"{self.name}: {len(self.train)} train / {len(self.test)} test images of 3x{self.image_size}x"
                f"{self.image_size}, {self.classes} classes")

    def loaders(self, batch_size: int = 64, *, seed: int = 0, workers: int = 0, test_batch_size: int | None = None):
        """(train loader, test loader). The train loader shuffles with a generator seeded by
        ``seed`` (the same order on every run) and drops a last partial batch when there is more
        than one batch (BatchNorm in training mode cannot take a batch of one); the test loader
        keeps the order and every image.

        Parameters
        ----------
        batch_size : int
            Training batch size (the test loader uses ``test_batch_size``, default 2 * batch_size).
        seed : int
            Seed of the shuffle.
        workers : int
            DataLoader worker processes (0: load in the main process).
        """
        from torch.utils.data import DataLoader

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        g = torch.Generator().manual_seed(int(seed))
        train = DataLoader(self.train, batch_size=batch_size, shuffle=True, generator=g, num_workers=workers,
                           drop_last=len(self.train) > batch_size)
        test = DataLoader(self.test, batch_size=test_batch_size or 2 * batch_size, shuffle=False, num_workers=workers)
        return train, test

    def calibration(self, samples: int, batch_size: int = 64, *, seed: int = 0, progress=None) -> list:
        """A fixed, seeded subset of ``samples`` training images, as a list of (images, labels)
        batches (``gfs.prune`` reads the images; criterion "loss" also the labels).

        The same arguments give the same tensors on every run, so that a resumed pruning run
        sees the calibration data it started with. ``progress``: an optional callable called
        with the number of images read so far.
        """
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be an int >= 1, got {samples!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        n = min(samples, len(self.train))
        idx = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(int(seed)))[:n]
        images, labels = [], []
        for j, i in enumerate(idx):
            x, y = self.train[int(i)]
            images.append(x)
            labels.append(int(y))
            if progress is not None and ((j + 1) % 64 == 0 or j + 1 == n):
                progress(j + 1)
        x, y = torch.stack(images), torch.tensor(labels, dtype=torch.long)
        return list(zip(x.split(batch_size), y.split(batch_size)))

    def subset(self, train: int | None = None, test: int | None = None, *, seed: int = 0) -> "ImageData":
        """A copy with at most ``train`` / ``test`` images of each split (a seeded random subset)."""
        from torch.utils.data import Subset

        g = torch.Generator().manual_seed(int(seed))

        def take(ds, n):
            if n is None or n >= len(ds):
                return ds
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"subset sizes must be ints >= 1 or None, got {n!r}")
            return Subset(ds, torch.randperm(len(ds), generator=g)[:n].tolist())

        name = self.name + (f", subset {train or len(self.train)} / {test or len(self.test)}" if train or test else "")
        return ImageData(name, take(self.train, train), take(self.test, test), self.classes, self.image_size, self.spec)


def _digits_images(image_size: int, test_fraction: float, seed: int) -> ImageData:
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch.utils.data import TensorDataset

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32))[:, None]  # (n, 1, 8, 8), values 0..16
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = _stratified_split(y, test_fraction, seed)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1)
    x_train, x_test = x[torch.from_numpy(train_idx)], x[torch.from_numpy(test_idx)]
    mean, std = x_train.mean(), x_train.std()  # one value for every pixel: the images are grey
    x_train, x_test = ((x_train - mean) / std).contiguous(), ((x_test - mean) / std).contiguous()
    yt = torch.from_numpy(y)
    return ImageData(f"digits (scikit-learn 8x8, upsampled to {image_size}x{image_size}, 3 channels)",
                     TensorDataset(x_train, yt[torch.from_numpy(train_idx)]),
                     TensorDataset(x_test, yt[torch.from_numpy(test_idx)]), 10, image_size, "digits")


def _transform(image_size: int, native: int | None, mean, std):
    from torchvision import transforms as T

    steps = []
    if native is None:  # arbitrary photos: resize the short side, crop the centre
        steps += [T.Resize(int(round(image_size / 0.875))), T.CenterCrop(image_size)]
    elif image_size != native:
        steps += [T.Resize(image_size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def _cifar10(directory: str, image_size: int, what: str) -> ImageData:
    import torchvision

    folder = os.path.join(directory, "cifar-10-batches-py")
    expected = ("cifar10:DIR expects DIR/cifar-10-batches-py holding data_batch_1 .. data_batch_5, test_batch and "
                "batches.meta (the folder torchvision.datasets.CIFAR10(root=DIR) reads; nothing is downloaded)")
    if not os.path.isdir(directory):
        raise DataSpecError(f"{what} cifar10:{directory}: {directory!r} is not a folder; {expected}")
    if not os.path.isdir(folder):
        raise DataSpecError(f"{what} cifar10:{directory}: no folder {folder!r}; {expected}")
    tf = _transform(image_size, 32, _CIFAR10_MEAN, _CIFAR10_STD)
    try:
        train = torchvision.datasets.CIFAR10(directory, train=True, transform=tf, download=False)
        test = torchvision.datasets.CIFAR10(directory, train=False, transform=tf, download=False)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DataSpecError(f"{what} cifar10:{directory}: torchvision cannot read {folder!r} ({exc}); {expected}") from None
    return ImageData(f"CIFAR-10 ({folder}, {image_size}x{image_size})", train, test, len(train.classes), image_size,
                     f"cifar10:{directory}")


def _imagefolder(directory: str, image_size: int, test_fraction: float, seed: int, what: str) -> ImageData:
    import torchvision
    from torch.utils.data import Subset

    expected = ("imagefolder:DIR expects one sub-folder of images per class, in DIR/train and DIR/val "
                "(or DIR/test), or directly in DIR (then split into train and test by a seeded, stratified shuffle)")
    if not os.path.isdir(directory):
        raise DataSpecError(f"{what} imagefolder:{directory}: {directory!r} is not a folder; {expected}")
    tf = _transform(image_size, None, _IMAGENET_MEAN, _IMAGENET_STD)

    def folder(path):
        try:
            return torchvision.datasets.ImageFolder(path, transform=tf)
        except (FileNotFoundError, RuntimeError) as exc:  # no class folders / no images
            raise DataSpecError(f"{what} imagefolder:{directory}: {path!r}: {exc}; {expected}") from None

    train_dir = os.path.join(directory, "train")
    val_dir = next((os.path.join(directory, v) for v in ("val", "test") if os.path.isdir(os.path.join(directory, v))),
                   None)
    if os.path.isdir(train_dir) and val_dir is not None:
        train, test = folder(train_dir), folder(val_dir)
        if train.classes != test.classes:
            raise DataSpecError(
                f"{what} imagefolder:{directory}: the class folders differ between {train_dir!r} "
                f"({_few(train.classes)}) and {val_dir!r} ({_few(test.classes)}); both need the same classes")
        where = f"{train_dir} / {val_dir}"
    elif os.path.isdir(train_dir):
        raise DataSpecError(f"{what} imagefolder:{directory}: {train_dir!r} exists but no DIR/val or DIR/test beside it; "
                            f"{expected}")
    else:
        full = folder(directory)
        tr, te = _stratified_split(np.asarray(full.targets, dtype=np.int64), test_fraction, seed)
        if len(tr) == 0 or len(te) == 0:
            raise DataSpecError(f"{what} imagefolder:{directory}: {len(full)} images are too few to split into train "
                                f"and test; add images or give DIR/train and DIR/val")
        train, test = Subset(full, tr.tolist()), Subset(full, te.tolist())
        train.classes = test.classes = full.classes
        where = f"{directory}, split {1 - test_fraction:.0%} / {test_fraction:.0%} with seed {seed}"
    return ImageData(f"image folder ({where}, {image_size}x{image_size})", train, test, len(train.classes), image_size,
                     f"imagefolder:{directory}")


def _few(names, n=5):
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def load_image_data(spec: str | None = "digits", *, image_size: int | None = None, test_fraction: float = 0.2,
                    seed: int = 0, what: str = "--data") -> ImageData:
    """Image classification data from a spec string (the CLI's ``--data``).

    Parameters
    ----------
    spec : str or None
        ``"digits"`` (or None / ""): scikit-learn's 8x8 digits, shipped inside scikit-learn (no
        download), upsampled bilinearly to ``image_size`` and repeated to 3 channels,
        standardised with the training split's mean and standard deviation, split by a seeded
        stratified shuffle. ``"cifar10:DIR"``: CIFAR-10 from local files in torchvision's layout
        (DIR/cifar-10-batches-py), its own train / test split. ``"imagefolder:DIR"``:
        torchvision.datasets.ImageFolder (one sub-folder per class), resized and centre-cropped;
        DIR/train and DIR/val (or DIR/test) when present, else a seeded stratified split of DIR.
    image_size : int, optional
        Side of the images. Default 32 for digits and CIFAR-10, 224 for image folders.
    test_fraction : float
        Share held out for testing where the data have no test split (digits, a single folder).
    seed : int
        Seed of that split.
    what : str
        How the caller names the spec in error messages (default ``"--data"``).

    Returns
    -------
    ImageData
        ``.train``, ``.test`` (datasets of (image, label)), ``.classes``, ``.image_size``,
        ``.loaders(batch_size, seed=...)``, ``.calibration(samples, ...)``.

    Raises
    ------
    DataSpecError
        For a spec of another form, or a folder that is missing or not in the expected layout;
        the message names ``what`` and says what is expected.
    """
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "digits")):
        kind, arg = "digits", None
    elif isinstance(spec, str) and ":" in spec and spec.split(":", 1)[0] in ("cifar10", "imagefolder"):
        kind, arg = spec.split(":", 1)
        if not arg:
            raise DataSpecError(f"{what} {spec!r}: the folder is missing after '{kind}:'; expected {kind}:DIR")
        arg = os.path.expanduser(arg)
    else:
        raise DataSpecError(f"{what} {spec!r} is not a data spec; expected one of: " + "; ".join(DATA_SPECS))
    if image_size is None:
        image_size = 224 if kind == "imagefolder" else 32
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 4096:
        raise ValueError(f"image_size must be an int between 8 and 4096, got {image_size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if kind == "digits":
        return _digits_images(image_size, test_fraction, seed)
    if kind == "cifar10":
        return _cifar10(arg, image_size, what)
    return _imagefolder(arg, image_size, test_fraction, seed, what)

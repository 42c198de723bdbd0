"""Image classification data for CNNs (gfs prune, the demo's CNN part, the baselines), loaded
from a spec string (the CLI's ``--data``):

- ``digits``: scikit-learn's 8x8 digits (shipped with scikit-learn, nothing is downloaded),
  upsampled to RGB images;
- ``cifar10:DIR``: CIFAR-10 from local files in torchvision's layout;
- ``imagefolder:DIR``: torchvision's ImageFolder (one sub-folder of images per class);
- ``fashion-mnist[:DIR]`` and ``mnist:DIR``: 28x28 grey images in MNIST's four IDX files (plain or
  gzipped), DIR defaulting to /usr/share/datasets/fashion-mnist for Fashion-MNIST (the Debian
  package dataset-fashion-mnist). For the CNNs they are zero-padded to 32x32 (the background is
  0, so padding adds background; LeNet-5 fed MNIST the same way), standardised with the
  training split's pixel mean and standard deviation, and repeated to 3 identical channels, so
  every model of the zoo takes them unchanged (the first convolution sees three equal planes:
  3x the FLOPs of a 1-channel first layer, 0.3% of ResNet-56's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .._validation import check_int
from .idx import MNIST_FILES
from .splits import stratified_split

DATA_SPECS = (
    "digits (the default: scikit-learn's 8x8 digits, shipped with scikit-learn, upsampled to RGB images)",
    "cifar10:DIR (DIR/cifar-10-batches-py, as torchvision.datasets.CIFAR10(root=DIR) reads it)",
    "imagefolder:DIR (class sub-folders of images; DIR/train and DIR/val if present, else a seeded split of DIR)",
    "fashion-mnist[:DIR] (Fashion-MNIST's four IDX files, plain or .gz; DIR defaults to "
    "/usr/share/datasets/fashion-mnist, from the Debian package dataset-fashion-mnist)",
    "mnist:DIR (MNIST's four IDX files, plain or .gz: train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)",
)

# Where the Debian package dataset-fashion-mnist installs the four gzipped IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_KINDS = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST"}

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
        The spec it was loaded from (``"digits"``, ``"cifar10:DIR"``, ``"imagefolder:DIR"``,
        ``"fashion-mnist"``, ``"fashion-mnist:DIR"``, ``"mnist:DIR"``).
    """

    name: str
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    classes: int
    image_size: int
    spec: str

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.train)} train / {len(self.test)} test images of 3x{self.image_size}x"
            f"{self.image_size}, {self.classes} classes"
        )

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

        batch_size = check_int(batch_size, "batch_size")
        g = torch.Generator().manual_seed(int(seed))
        train = DataLoader(
            self.train,
            batch_size=batch_size,
            shuffle=True,
            generator=g,
            num_workers=workers,
            drop_last=len(self.train) > batch_size,
        )
        test = DataLoader(self.test, batch_size=test_batch_size or 2 * batch_size, shuffle=False, num_workers=workers)
        return train, test

    def calibration(self, samples: int, batch_size: int = 64, *, seed: int = 0, progress=None) -> list:
        """A fixed, seeded subset of ``samples`` training images, as a list of (images, labels)
        batches (``gfs.prune`` reads the images; criterion "loss" also the labels).

        The same arguments give the same tensors on every run, so that a resumed pruning run
        sees the calibration data it started with. ``progress``: an optional callable called
        with the number of images read so far.
        """
        samples, batch_size = check_int(samples, "samples"), check_int(batch_size, "batch_size")
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
        return list(zip(x.split(batch_size), y.split(batch_size), strict=True))

    def subset(self, train: int | None = None, test: int | None = None, *, seed: int = 0) -> ImageData:
        """A copy with at most ``train`` / ``test`` images of each split (a seeded random subset)."""
        from torch.utils.data import Subset

        g = torch.Generator().manual_seed(int(seed))

        def take(ds, n, what):
            if n is None or check_int(n, what) >= len(ds):
                return ds
            return Subset(ds, torch.randperm(len(ds), generator=g)[:n].tolist())

        name = self.name + (f", subset {train or len(self.train)} / {test or len(self.test)}" if train or test else "")
        return ImageData(
            name,
            take(self.train, train, "train"),
            take(self.test, test, "test"),
            self.classes,
            self.image_size,
            self.spec,
        )


def _digits_images(image_size: int, test_fraction: float, seed: int) -> ImageData:
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch.utils.data import TensorDataset

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32))[:, None]  # (n, 1, 8, 8), values 0..16
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1)
    x_train, x_test = x[torch.from_numpy(train_idx)], x[torch.from_numpy(test_idx)]
    mean, std = x_train.mean(), x_train.std()  # one value for every pixel: the images are grey
    x_train, x_test = ((x_train - mean) / std).contiguous(), ((x_test - mean) / std).contiguous()
    yt = torch.from_numpy(y)
    return ImageData(
        f"digits (scikit-learn 8x8, upsampled to {image_size}x{image_size}, 3 channels)",
        TensorDataset(x_train, yt[torch.from_numpy(train_idx)]),
        TensorDataset(x_test, yt[torch.from_numpy(test_idx)]),
        10,
        image_size,
        "digits",
    )


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
    expected = (
        "cifar10:DIR expects DIR/cifar-10-batches-py holding data_batch_1 .. data_batch_5, test_batch and "
        "batches.meta (the folder torchvision.datasets.CIFAR10(root=DIR) reads; nothing is downloaded)"
    )
    if not os.path.isdir(directory):
        raise DataSpecError(f"{what} cifar10:{directory}: {directory!r} is not a folder; {expected}")
    if not os.path.isdir(folder):
        raise DataSpecError(f"{what} cifar10:{directory}: no folder {folder!r}; {expected}")
    tf = _transform(image_size, 32, _CIFAR10_MEAN, _CIFAR10_STD)
    try:
        train = torchvision.datasets.CIFAR10(directory, train=True, transform=tf, download=False)
        test = torchvision.datasets.CIFAR10(directory, train=False, transform=tf, download=False)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DataSpecError(
            f"{what} cifar10:{directory}: torchvision cannot read {folder!r} ({exc}); {expected}"
        ) from None
    return ImageData(
        f"CIFAR-10 ({folder}, {image_size}x{image_size})",
        train,
        test,
        len(train.classes),
        image_size,
        f"cifar10:{directory}",
    )


def _imagefolder(directory: str, image_size: int, test_fraction: float, seed: int, what: str) -> ImageData:
    import torchvision
    from torch.utils.data import Subset

    expected = (
        "imagefolder:DIR expects one sub-folder of images per class, in DIR/train and DIR/val "
        "(or DIR/test), or directly in DIR (then split into train and test by a seeded, stratified shuffle)"
    )
    if not os.path.isdir(directory):
        raise DataSpecError(f"{what} imagefolder:{directory}: {directory!r} is not a folder; {expected}")
    tf = _transform(image_size, None, _IMAGENET_MEAN, _IMAGENET_STD)

    def folder(path):
        try:
            return torchvision.datasets.ImageFolder(path, transform=tf)
        except (FileNotFoundError, RuntimeError) as exc:  # no class folders / no images
            raise DataSpecError(f"{what} imagefolder:{directory}: {path!r}: {exc}; {expected}") from None

    train_dir = os.path.join(directory, "train")
    val_dir = next(
        (os.path.join(directory, v) for v in ("val", "test") if os.path.isdir(os.path.join(directory, v))), None
    )
    if os.path.isdir(train_dir) and val_dir is not None:
        train, test = folder(train_dir), folder(val_dir)
        if train.classes != test.classes:
            raise DataSpecError(
                f"{what} imagefolder:{directory}: the class folders differ between {train_dir!r} "
                f"({_few(train.classes)}) and {val_dir!r} ({_few(test.classes)}); both need the same classes"
            )
        where = f"{train_dir} / {val_dir}"
    elif os.path.isdir(train_dir):
        raise DataSpecError(
            f"{what} imagefolder:{directory}: {train_dir!r} exists but no DIR/val or DIR/test beside it; {expected}"
        )
    else:
        full = folder(directory)
        tr, te = stratified_split(np.asarray(full.targets, dtype=np.int64), test_fraction, seed)
        if len(tr) == 0 or len(te) == 0:
            raise DataSpecError(
                f"{what} imagefolder:{directory}: {len(full)} images are too few to split into train "
                f"and test; add images or give DIR/train and DIR/val"
            )
        train, test = Subset(full, tr.tolist()), Subset(full, te.tolist())
        train.classes = test.classes = full.classes
        where = f"{directory}, split {1 - test_fraction:.0%} / {test_fraction:.0%} with seed {seed}"
    return ImageData(
        f"image folder ({where}, {image_size}x{image_size})",
        train,
        test,
        len(train.classes),
        image_size,
        f"imagefolder:{directory}",
    )


class IdxImages(torch.utils.data.Dataset):
    """Grey images kept as uint8 (n, rows, cols) and converted per item (or per batch: the
    DataLoader calls ``__getitems__``): scaled to [0, 1], zero-padded (``pad`` pixels on every
    side) or resized to ``image_size``, standardised by ``mean`` / ``std``, repeated to
    ``channels``. Items are ``(float32 tensor (channels, image_size, image_size), int label)``."""

    def __init__(self, images, labels, *, image_size: int, mean: float, std: float, channels: int = 3):
        self.images = torch.as_tensor(images, dtype=torch.uint8)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.image_size, self.mean, self.std, self.channels = int(image_size), float(mean), float(std), int(channels)
        rows, cols = self.images.shape[1:]
        grow = self.image_size - rows
        self.pad = grow // 2 if rows == cols and grow >= 0 and grow % 2 == 0 and grow <= 8 else None

    def __len__(self) -> int:
        return len(self.images)

    def convert(self, u8: torch.Tensor) -> torch.Tensor:
        """(n, rows, cols) uint8 -> (n, channels, image_size, image_size) float32."""
        import torch.nn.functional as F

        x = u8.to(torch.float32).div_(255.0)[:, None]
        if self.pad:
            x = F.pad(x, (self.pad,) * 4)
        elif self.pad is None:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return x.expand(-1, self.channels, -1, -1).contiguous()

    def __getitem__(self, i):
        i = int(i)
        return self.convert(self.images[i : i + 1])[0], int(self.labels[i])

    def __getitems__(self, indices):
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return list(zip(self.convert(self.images[idx]).unbind(0), self.labels[idx].tolist(), strict=True))


def _idx_package(kind: str) -> str:
    if kind != "fashion-mnist":
        return ""
    return (
        " (install the Debian package dataset-fashion-mnist: `apt-get install dataset-fashion-mnist` puts them in "
        f"{FASHION_MNIST_DIR}, which fashion-mnist without a folder reads)"
    )


def idx_folder(kind: str, directory: str | None = None, what: str = "--data") -> str:
    """The folder of a data set in MNIST's IDX layout: ``directory``, or for ``kind``
    "fashion-mnist" without one /usr/share/datasets/fashion-mnist. DataSpecError (naming
    ``what``, and for Fashion-MNIST the Debian package dataset-fashion-mnist) when it is not a
    folder."""
    if kind not in _IDX_KINDS:
        raise ValueError(f"kind must be one of {', '.join(_IDX_KINDS)}, got {kind!r}")
    if directory is None and kind != "fashion-mnist":
        raise DataSpecError(f"{what} {kind}: give the folder of {_IDX_KINDS[kind]}'s four IDX files, {kind}:DIR")
    folder = FASHION_MNIST_DIR if directory is None else os.path.expanduser(directory)
    if not os.path.isdir(folder):
        spec = kind if directory is None else f"{kind}:{directory}"
        form = f"{kind}[:DIR]" if kind == "fashion-mnist" else f"{kind}:DIR"
        raise DataSpecError(
            f"{what} {spec}: {folder!r} is not a folder; {form} expects a folder holding {_IDX_KINDS[kind]}'s four "
            f"IDX files {', '.join(MNIST_FILES)} (each plain or .gz){_idx_package(kind)}"
        )
    return folder


def _idx_images(kind: str, directory: str | None, image_size: int, what: str) -> ImageData:
    from .idx import IdxError, read_idx_splits

    label = _IDX_KINDS[kind]
    spec = kind if directory is None else f"{kind}:{directory}"
    folder = idx_folder(kind, directory, what)
    package = _idx_package(kind)
    try:
        splits = read_idx_splits(folder, test=True, layout=label)
    except IdxError as exc:
        raise DataSpecError(f"{what} {spec}: {exc}{package}") from None
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["t10k"]
    if x_train.ndim != 3 or x_train.shape[1] != x_train.shape[2] or len(x_train) == 0 or len(x_test) == 0:
        raise DataSpecError(
            f"{what} {spec}: expected square grey images in both splits, got {x_train.shape} train and "
            f"{x_test.shape} test"
        )
    # pixel mean and standard deviation of the (unpadded) training images, exactly, from a histogram
    counts = np.bincount(np.ascontiguousarray(x_train, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    values = np.arange(256, dtype=np.float64) / 255.0
    mean = float((counts * values).sum() / counts.sum())
    std = float(np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum()))
    classes = int(max(y_train.max(), y_test.max())) + 1
    side = x_train.shape[1]

    def make(x, y):
        return IdxImages(x, y, image_size=image_size, mean=mean, std=std)

    train = make(x_train, y_train)
    how = (
        f"zero-padded to {image_size}x{image_size}"
        if train.pad
        else (f"{side}x{side}" if train.pad == 0 else f"resized to {image_size}x{image_size}")
    )
    return ImageData(
        f"{label} ({folder}; {side}x{side} grey, {how}, 3 identical channels)",
        train,
        make(x_test, y_test),
        max(classes, 10),
        image_size,
        spec,
    )


def _few(names, n=5):
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def load_image_data(
    spec: str | None = "digits",
    *,
    image_size: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    what: str = "--data",
) -> ImageData:
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
        ``"fashion-mnist"`` / ``"fashion-mnist:DIR"`` / ``"mnist:DIR"``: MNIST's four IDX files
        (plain or .gz; DIR defaults to /usr/share/datasets/fashion-mnist, the Debian package
        dataset-fashion-mnist), their own train / test split; the 28x28 grey images are
        zero-padded to 32x32 (other sizes: resized bilinearly; 28: as they are), standardised with
        the training images' pixel mean and standard deviation and repeated to 3 channels.
    image_size : int, optional
        Side of the images. Default 32 for digits, CIFAR-10, MNIST and Fashion-MNIST, 224 for
        image folders.
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
        the message names ``what`` and says what is expected (for Fashion-MNIST: the Debian
        package dataset-fashion-mnist and ``apt-get install dataset-fashion-mnist``).
    """
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "digits")):
        kind, arg = "digits", None
    elif isinstance(spec, str) and spec.strip() == "fashion-mnist":
        kind, arg = "fashion-mnist", None
    elif isinstance(spec, str) and spec.strip() == "mnist":
        raise DataSpecError(
            f"{what} 'mnist': give the folder of MNIST's four IDX files, mnist:DIR (no copy of MNIST is installed "
            f"with gfs; fashion-mnist reads Fashion-MNIST from {FASHION_MNIST_DIR})"
        )
    elif isinstance(spec, str) and ":" in spec and spec.split(":", 1)[0] in ("cifar10", "imagefolder", *_IDX_KINDS):
        kind, arg = spec.split(":", 1)
        if not arg:
            raise DataSpecError(f"{what} {spec!r}: the folder is missing after '{kind}:'; expected {kind}:DIR")
        arg = os.path.expanduser(arg)
    else:
        raise DataSpecError(f"{what} {spec!r} is not a data spec; expected one of: " + "; ".join(DATA_SPECS))
    if image_size is None:
        image_size = 224 if kind == "imagefolder" else 32
    image_size = check_int(image_size, "image_size", 8, 4096)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if kind == "digits":
        return _digits_images(image_size, test_fraction, seed)
    if kind == "cifar10":
        return _cifar10(arg, image_size, what)
    if kind in _IDX_KINDS:
        return _idx_images(kind, arg, image_size, what)
    return _imagefolder(arg, image_size, test_fraction, seed, what)

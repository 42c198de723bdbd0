"""Data sets for the demo, `gfs prune` and the studies; nothing is downloaded.

- `tabular`: the one `Dataset` type (rows of features, split into train and test) and
  scikit-learn's 8x8 digits as such rows (`load_digits_split`, `load_digits`).
- `idx`: the IDX file format (`read_idx`, `write_idx`) and data sets in MNIST's four-file IDX
  layout (MNIST, Fashion-MNIST) from local files, plain or gzipped (`read_idx_splits`,
  `load_mnist_idx`).
- `images`: image classification data for CNNs (`ImageData`) from a spec string
  (`load_image_data`: digits, cifar10:DIR, imagefolder:DIR, fashion-mnist[:DIR], mnist:DIR).
- `splits`: which examples go where (a stratified split, class-balanced nested subsets).
"""

from .idx import MNIST_FILES, IdxError, load_mnist_idx, read_idx, read_idx_splits, write_idx
from .images import DATA_SPECS, FASHION_MNIST_DIR, DataSpecError, IdxImages, ImageData, idx_folder, load_image_data
from .splits import balanced_quotas, balanced_subsets, stratified_split
from .tabular import Dataset, load_digits, load_digits_split, standardise

__all__ = [
    "Dataset",
    "load_digits_split",
    "load_digits",
    "standardise",
    "ImageData",
    "load_image_data",
    "DataSpecError",
    "DATA_SPECS",
    "FASHION_MNIST_DIR",
    "IdxImages",
    "idx_folder",
    "read_idx_splits",
    "load_mnist_idx",
    "read_idx",
    "write_idx",
    "IdxError",
    "MNIST_FILES",
    "stratified_split",
    "balanced_quotas",
    "balanced_subsets",
]

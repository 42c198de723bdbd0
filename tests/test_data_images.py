"""--data fashion-mnist[:DIR] and mnist:DIR: 28x28 grey images from MNIST-layout IDX files (made
here, gzipped as the Debian package ships them; the real data set is never needed), padded to
32x32 and repeated to 3 channels for the CNNs; the error that names the Debian package; and
`gfs prune --model resnet56 --data fashion-mnist:DIR` end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from gfs.cli import main
from gfs.data import FASHION_MNIST_DIR, DataSpecError, load_image_data, read_idx, write_idx
from gfs.data import images as images_module

pytestmark = pytest.mark.usefixtures("one_thread")


def write_fashion(folder, n_train=60, n_test=30, side=28, gz=True, seed=0):
    """Four IDX files in MNIST's layout: random grey images (a zero border, as in the real ones) and
    labels 0..9 in turn."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        images[:, :2] = images[:, -2:] = 0
        images[:, :, :2] = images[:, :, -2:] = 0
        arrays[f"{split}-images-idx3-ubyte"] = images
        arrays[f"{split}-labels-idx1-ubyte"] = (np.arange(n) % 10).astype(np.uint8)
    for name, array in arrays.items():
        write_idx(os.path.join(folder, name + (".gz" if gz else "")), array)
    return arrays


def test_gzipped_idx_files_are_read(tmp_path):
    arrays = write_fashion(str(tmp_path))
    back = read_idx(str(tmp_path / "train-images-idx3-ubyte.gz"))
    assert back.dtype == np.uint8 and np.array_equal(back, arrays["train-images-idx3-ubyte"])


def test_fashion_mnist_padded_to_32_with_3_channels(tmp_path):
    arrays = write_fashion(str(tmp_path))
    data = load_image_data(f"fashion-mnist:{tmp_path}")
    assert (len(data.train), len(data.test), data.classes, data.image_size) == (60, 30, 10, 32)
    assert data.spec == f"fashion-mnist:{tmp_path}" and "Fashion-MNIST" in data.name and "padded" in data.name
    pixels = arrays["train-images-idx3-ubyte"] / 255.0
    mean, std = pixels.mean(), pixels.std()  # the training images' statistics, before padding
    x, y = data.train[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 5
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # three identical channels
    expected = (torch.from_numpy(arrays["train-images-idx3-ubyte"][5]).float() / 255 - mean) / std
    assert torch.allclose(x[0, 2:30, 2:30], expected, atol=1e-5)
    assert torch.allclose(x[0, :2], torch.full((2, 32), -mean / std), atol=1e-6)  # padding is background
    # a batch (DataLoader's __getitems__) gives what single items give
    train, test = data.loaders(batch_size=16, seed=0)
    xb, yb = next(iter(test))
    assert xb.shape == (30, 3, 32, 32) and yb.dtype == torch.long
    assert torch.allclose(xb[7], data.test[7][0]) and int(yb[7]) == 7
    assert next(iter(train))[0].shape == (16, 3, 32, 32)
    calib = data.calibration(20, batch_size=8, seed=1)
    assert [b[0].shape[0] for b in calib] == [8, 8, 4]


def test_other_sizes_and_mnist(tmp_path):
    write_fashion(str(tmp_path), gz=False)
    native = load_image_data(f"mnist:{tmp_path}", image_size=28)
    assert native.train[0][0].shape == (3, 28, 28) and "MNIST" in native.name and "Fashion" not in native.name
    small = load_image_data(f"mnist:{tmp_path}", image_size=16)
    assert small.train[0][0].shape == (3, 16, 16) and "resized" in small.name
    assert load_image_data(f"fashion-mnist:{tmp_path}").describe().startswith("Fashion-MNIST")


def test_missing_data_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(images_module, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(DataSpecError) as exc:
        load_image_data("fashion-mnist")
    msg = str(exc.value)
    assert "dataset-fashion-mnist" in msg and "apt-get install dataset-fashion-mnist" in msg and "absent" in msg
    assert FASHION_MNIST_DIR == "/usr/share/datasets/fashion-mnist"
    with pytest.raises(DataSpecError, match="mnist:DIR"):
        load_image_data("mnist")
    with pytest.raises(DataSpecError, match="is not a folder"):
        load_image_data(f"mnist:{tmp_path / 'nowhere'}")
    write_fashion(str(tmp_path / "half"))
    os.remove(tmp_path / "half" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataSpecError, match=r"--data fashion-mnist:.*t10k-labels-idx1-ubyte: not found"):
        load_image_data(f"fashion-mnist:{tmp_path / 'half'}")


def test_gfs_prune_resnet56_on_fashion_mnist_files(tmp_path, capsys):
    write_fashion(str(tmp_path / "fm"), n_train=48, n_test=24)
    out = tmp_path / "r56.safetensors"
    argv = ["prune", "--model", "resnet56", "--data", f"fashion-mnist:{tmp_path / 'fm'}", "--out", str(out)]
    argv += ["--train-epochs", "1", "--finetune-epochs", "0", "--calib-size", "16", "--batch-size", "16"]
    assert main([*argv, "--no-progress"]) == 0
    report = json.loads((tmp_path / "r56.safetensors.json").read_text())
    assert report["groups"] == 27 and report["channels"] == [1008, 504]
    assert "Fashion-MNIST" in report["data"] and report["job"]["model"] == "resnet56"
    assert max(r["fold_error"] for r in report["layers"]) < 1e-4
    assert "resnet56" in capsys.readouterr().out
